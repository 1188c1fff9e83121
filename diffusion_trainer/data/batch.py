"""What the denoiser is conditioned on and trained to denoise, made from a batch of samples:
from the caches when the run built them, else by running the VAE and text encoders."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from .captions import drop_captions


class ModelInputs:
    def __init__(self, family: Any, caption_dropout_rate: float, device: torch.device, text_cache: Any = None):
        self.family = family
        self.caption_dropout_rate = caption_dropout_rate
        self.device = device
        self.text_cache = text_cache

    def latents(self, batch: dict[str, Any]) -> torch.Tensor:
        if "latent_params" in batch:  # a fresh sample from the cached posterior, as encoding would draw
            posterior = DiagonalGaussianDistribution(batch["latent_params"].to(self.device, non_blocking=True))
            return self.family.latents_from_distribution(posterior)
        return self.family.encode_images(batch["pixel_values"].to(self.device, non_blocking=True))

    def conditioning(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        captions = drop_captions(batch["caption"], self.caption_dropout_rate)
        if self.text_cache is not None:
            return self.text_cache(captions)
        return self.family.encode_prompts(captions)
