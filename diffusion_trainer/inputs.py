"""What the denoiser is conditioned on and trained to denoise, made from a batch of samples."""

from __future__ import annotations

from typing import Any

import torch

from .data import drop_captions


class EncodedInputs:
    """Encodes every batch afresh: the VAE for latents, the text encoders for captions."""

    def __init__(self, family: Any, caption_dropout_rate: float, device: torch.device):
        self.family = family
        self.caption_dropout_rate = caption_dropout_rate
        self.device = device

    def latents(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.family.encode_images(batch["pixel_values"].to(self.device))

    def conditioning(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.family.encode_prompts(drop_captions(batch["caption"], self.caption_dropout_rate))
