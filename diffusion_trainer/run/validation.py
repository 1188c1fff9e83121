"""Validation loss: a held-out share of the dataset, never trained on, whose loss is measured at fixed
timesteps with fixed noise, so that the same model always gives the same number.

Everything random here comes from its own generators seeded with constants (not the run's seed and not
torch's global RNG): the training's random stream, and so exact resume, is the same with or without it,
and runs with other seeds (a sweep) are measured on the same images, timesteps and noise. Computed by the
main process alone, with the LoRA as it would be saved (the EMA weights when use_ema is on).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..objectives import weighted_loss

HOLDOUT_SEED = 2112  # which rows are held out: a function of the dataset's size alone
NOISE_SEED = 2113
LEVELS = 8  # fixed timesteps, two in each of the RANGES
RANGES = 4


def split_rows(count: int, fraction: float) -> tuple[list[int], list[int]]:
    """(training rows, held-out rows), each in dataset order: round(fraction x count) rows, at least
    one, drawn with a fixed seed. fraction 0: every row trains."""
    if fraction <= 0:
        return list(range(count)), []
    held = max(1, round(fraction * count))
    if held >= count:
        raise InputError(f"validation_split: {fraction} of {count} image(s) holds out {held}, leaving none to "
                         "train on; use a smaller fraction (or 0 for no validation) or a larger dataset.")
    chosen = set(np.random.default_rng(HOLDOUT_SEED).permutation(count)[:held].tolist())
    return [row for row in range(count) if row not in chosen], sorted(chosen)


def fixed_timesteps(num_train_timesteps: int) -> list[int]:
    """LEVELS timesteps spread evenly over the schedule, in the middle of their slots."""
    return [int((k + 0.5) * num_train_timesteps / LEVELS) for k in range(LEVELS)]


def range_names(num_train_timesteps: int) -> list[tuple[str, int, int]]:
    width = num_train_timesteps // RANGES
    return [(f"val/loss_t{k * width}-{(k + 1) * width}", k * width, (k + 1) * width) for k in range(RANGES)]


class _Mean:
    """A VAE posterior that 'samples' its mean: the held-out latents do not draw on any RNG."""

    def __init__(self, distribution: Any):
        self.distribution = distribution

    def sample(self) -> torch.Tensor:
        return self.distribution.mode()


@dataclass
class HeldOut:
    latents: torch.Tensor  # (1, C, H, W), on the CPU
    noise: torch.Tensor  # (LEVELS, C, H, W), on the CPU
    conditioning: dict[str, torch.Tensor]  # batch of one, on the CPU; or each text encoder's part (below)
    batch: dict[str, Any]  # the one-item batch (sizes and crop, for micro-conditioning)
    caption: str = ""
    per_encoder: bool = False  # conditioning holds encode_text's parts: a trained encoder's are redone


class Validation:
    """The held-out images, encoded once (before the encoders are parked), and their loss."""

    def __init__(self, family: Any, samples: Any, accelerator: Any, loss_type: str, huber_c: float,
                 ema: Any = None):
        self.family, self.accelerator, self.ema = family, accelerator, ema
        self.loss_type, self.huber_c = loss_type, huber_c
        self.num_train_timesteps = int(getattr(family.objective, "num_train_timesteps", 0)
                                       or family.objective.scheduler.config.num_train_timesteps)
        self.timesteps = fixed_timesteps(self.num_train_timesteps)
        generator = torch.Generator().manual_seed(NOISE_SEED)
        self.items = [self._encode(samples[i], generator) for i in range(len(samples))]

    def __len__(self) -> int:
        return len(self.items)

    @torch.no_grad()
    def _encode(self, item: dict[str, Any], generator: torch.Generator) -> HeldOut:
        batch = torch.utils.data.default_collate([item])
        vae = self.family.vae
        posterior = vae.encode(batch.pop("pixel_values").to(vae.device, vae.dtype)).latent_dist
        latents = self.family.latents_from_distribution(_Mean(posterior)).float().cpu()
        noise = torch.randn((LEVELS, *latents.shape[1:]), generator=generator)
        family, caption = self.family, item["caption"]
        per_encoder = bool(family.trainable_text_attrs)  # train_text_encoder may put an adapter on them later
        encoded = (family.encode_text([caption], family.text_encoder_attrs) if per_encoder
                   else family.encode_prompts([caption]))
        return HeldOut(latents, noise, {k: v.cpu() for k, v in encoded.items()}, batch, caption, per_encoder)

    def conditioning(self, item: HeldOut, device: torch.device) -> dict[str, torch.Tensor]:
        """The held-out caption's conditioning now: the text encoders being trained encode it again."""
        cached = {k: v.to(device) for k, v in item.conditioning.items()}
        if not item.per_encoder:
            return cached
        if self.family.trained_text:
            cached.update(self.family.encode_text([item.caption], self.family.trained_text))
        return self.family.combine_text(cached)

    @torch.no_grad()
    def losses(self) -> dict[str, float]:
        """val/loss (the mean over images and fixed timesteps) and one val/loss_t<a>-<b> per timestep range."""
        denoiser = self.family.denoiser
        device = self.accelerator.device
        dtype = denoiser.dtype  # the base weights' (diffusers' ModelMixin)
        per_level = torch.zeros(LEVELS, dtype=torch.float64)
        modules = [denoiser, *(getattr(self.family.pipeline, a) for a in self.family.trained_text)]
        was_training = [m.training for m in modules]
        for module in modules:
            module.eval()  # no dropout: the same model gives the same number
        averaged = self.ema.applied() if self.ema is not None else nullcontext()
        try:
            with averaged, self.accelerator.autocast():
                for item in self.items:
                    latents = item.latents.to(device, dtype)
                    conditioning = self.conditioning(item, device)
                    for k, t in enumerate(self.timesteps):
                        noisy = self.family.objective.noisy_batch_at(
                            latents, item.noise[k:k + 1].to(device, dtype), torch.tensor([t], device=device))
                        prediction = self.family.predict(denoiser, noisy, conditioning, item.batch)
                        per_level[k] += weighted_loss(prediction, noisy.target, None, self.loss_type,
                                                      self.huber_c).double().item()
        finally:
            for module, training in zip(modules, was_training):
                module.train(training)
        per_level /= len(self.items)
        out = {"val/loss": float(per_level.mean())}
        for name, low, high in range_names(self.num_train_timesteps):
            inside = [per_level[k] for k, t in enumerate(self.timesteps) if low <= t < high]
            out[name] = float(sum(inside) / len(inside))
        return out
