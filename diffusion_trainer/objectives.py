"""The training objectives as small pure functions: noising, targets, loss weights, losses.

A model family picks an objective; the loop only sees a `NoisyBatch` and calls
`weighted_loss`. Nothing here knows an architecture's name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr


@dataclass
class NoisyBatch:
    """What the denoiser sees and what it should answer."""

    model_input: torch.Tensor  # x_t
    target: torch.Tensor
    timesteps: torch.Tensor  # in the scheduler's units (DDPM: integers 0..T-1)
    loss_weights: torch.Tensor | None = None  # one per sample, or None for uniform
    sigmas: torch.Tensor | None = None  # flow matching only: the noise level in [0, 1]


# --- losses -----------------------------------------------------------------------------

def elementwise_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str,
                     huber_c: float) -> torch.Tensor:
    """Per-element loss, in fp32.

    'l2': squared error. 'huber': the pseudo-Huber loss 2c(sqrt(d^2 + c^2) - c), as kohya's
    sd-scripts define huber_c ("Improved Techniques for Training Consistency Models",
    Song & Dhariwal 2023): about d^2 for |d| << c and about 2c|d| beyond.
    """
    diff = prediction.float() - target.float()
    if loss_type == "l2":
        return diff.square()
    if loss_type == "huber":
        return 2 * huber_c * (torch.sqrt(diff.square() + huber_c**2) - huber_c)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def weighted_loss(prediction: torch.Tensor, target: torch.Tensor, loss_weights: torch.Tensor | None,
                  loss_type: str = "l2", huber_c: float = 0.1) -> torch.Tensor:
    """Mean over each sample, times its weight, mean over the batch."""
    per_element = elementwise_loss(prediction, target, loss_type, huber_c)
    per_sample = per_element.mean(dim=tuple(range(1, per_element.ndim)))
    if loss_weights is not None:
        per_sample = per_sample * loss_weights.to(per_sample)
    return per_sample.mean()


# --- DDPM (SD 1.x/2.x, SDXL) --------------------------------------------------------------

def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float,
                    prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via
    Min-SNR Weighting Strategy"), as diffusers' training scripts compute them.

    epsilon: min(SNR, gamma) / SNR;  v_prediction: min(SNR, gamma) / (SNR + 1).
    At SNR = 0 (a zero-terminal-SNR schedule) the epsilon weight takes its limit, 1.
    """
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))


def offset_noise(latents: torch.Tensor, noise_offset: float) -> torch.Tensor:
    """Gaussian noise plus, when noise_offset > 0, a random constant per sample and channel
    (Guttenberg 2023, "Diffusion with Offset Noise"), which lets a model learn very dark or
    very bright images."""
    noise = torch.randn_like(latents)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(
            latents.shape[0], latents.shape[1], *([1] * (latents.ndim - 2)),
            device=latents.device, dtype=latents.dtype)
    return noise


class DDPMObjective:
    """Denoising diffusion as SD 1.x/2.x and SDXL were trained: noise from the model's own
    scheduler config, target = noise (epsilon) or velocity (v_prediction)."""

    def __init__(self, scheduler_config: dict, prediction_type: str, snr_gamma: float = 0.0,
                 noise_offset: float = 0.0):
        self.scheduler = DDPMScheduler.from_config(scheduler_config, prediction_type=prediction_type)
        self.prediction_type = prediction_type
        self.snr_gamma = snr_gamma
        self.noise_offset = noise_offset

    def noisy_batch(self, latents: torch.Tensor) -> NoisyBatch:
        noise = offset_noise(latents, self.noise_offset)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  device=latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        weights = None
        if self.snr_gamma:
            weights = min_snr_weights(self.scheduler, timesteps, self.snr_gamma, self.prediction_type)
        return NoisyBatch(noisy, target, timesteps, weights)
