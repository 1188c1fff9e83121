"""What the denoiser is conditioned on and trained to denoise, made from a batch of samples:
from the caches when the run built them, else by running the VAE and text encoders; and, with
masked_loss, where the loss counts (the batch's masks on the latent grid)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from .cache import latent_grid
from .captions import drop_captions, shuffled_tags


class ModelInputs:
    def __init__(self, family: Any, caption_dropout_rate: float, device: torch.device, text_cache: Any = None,
                 shuffle_caption: bool = False, keep_tokens: int = 0, caption_tag_dropout_rate: float = 0.0,
                 trigger_word: str = ""):
        self.family = family
        self.caption_dropout_rate = caption_dropout_rate
        self.device = device
        self.text_cache = text_cache
        self.shuffle_caption = shuffle_caption
        self.keep_tokens = keep_tokens
        self.caption_tag_dropout_rate = caption_tag_dropout_rate
        self.trigger_word = trigger_word

    @property
    def captions_vary(self) -> bool:
        """Whether captions are redrawn (tags shuffled or dropped) each time they are used."""
        return self.shuffle_caption or self.caption_tag_dropout_rate > 0

    def captions(self, batch: dict[str, Any], instances: int | None = None) -> list[str]:
        """The batch's captions as this step trains them: tags shuffled and dropped, then whole
        captions dropped, all drawn from torch's seeded RNG. Only the first `instances` (all when
        None) are; the rest (prior preservation's class captions) are trained as they are."""
        captions = list(batch["caption"])
        fixed = captions[instances:] if instances is not None else []
        captions = captions[:instances]
        if self.captions_vary:
            captions = [shuffled_tags(c, self.keep_tokens, self.trigger_word, self.caption_tag_dropout_rate,
                                      self.shuffle_caption) for c in captions]
        return drop_captions(captions, self.caption_dropout_rate) + fixed

    def latents(self, batch: dict[str, Any]) -> torch.Tensor:
        if "latent_params" in batch:  # a fresh sample from the cached posterior, as encoding would draw
            posterior = DiagonalGaussianDistribution(batch["latent_params"].to(self.device, non_blocking=True))
            return self.family.latents_from_distribution(posterior)
        return self.family.encode_images(batch["pixel_values"].to(self.device, non_blocking=True))

    def loss_mask(self, batch: dict[str, Any], latents: torch.Tensor) -> torch.Tensor | None:
        """B x 1 x h x w: the batch's masks (pixels, or cached on the latent grid) on the grid of
        `latents`; None without masked_loss."""
        if "mask" not in batch:
            return None
        size = tuple(latents.shape[-2:])
        masks = batch["mask"].to(self.device, torch.float32, non_blocking=True)
        return torch.stack([latent_grid(m, size) for m in masks])

    def conditioning(self, batch: dict[str, Any], instances: int | None = None) -> dict[str, torch.Tensor]:
        captions = self.captions(batch, instances)
        family, trained = self.family, self.family.trained_text
        if not trained:
            if self.text_cache is not None:
                return self.text_cache(captions)
            with torch.no_grad():
                return family.encode_prompts(captions)
        # trained encoders run every step, with gradients; frozen ones (T5) come from the cache
        if self.text_cache is not None:
            parts = dict(self.text_cache(captions))
        else:
            with torch.no_grad():
                parts = family.encode_text(captions, family.frozen_text_attrs)
        parts.update(family.encode_text(captions, trained))
        return family.combine_text(parts)
