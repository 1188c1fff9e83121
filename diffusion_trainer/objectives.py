"""The training objectives as small pure functions: noising, targets, loss weights, losses.

A model family picks an objective; the loop only sees a `NoisyBatch` and calls
`weighted_loss`. Nothing here knows an architecture's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDPMScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3, compute_snr


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
                  loss_type: str = "l2", huber_c: float = 0.1, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over each sample, times its weight, mean over the batch.

    With a `mask` (broadcast to the prediction, e.g. B x 1 x h x w, values in [0, 1]) each
    sample's mean is taken over its masked region alone, weighted by the mask: sum(m * loss) /
    sum(m * 1), so an element with m = 0 gets no gradient, and a sample masked out entirely counts 0."""
    per_element = elementwise_loss(prediction, target, loss_type, huber_c)
    dims = tuple(range(1, per_element.ndim))
    if mask is None:
        per_sample = per_element.mean(dim=dims)
    else:
        mask = mask.to(per_element).expand_as(per_element)
        kept = mask.sum(dim=dims)
        per_sample = (per_element * mask).sum(dim=dims) / kept.clamp(min=torch.finfo(kept.dtype).tiny)
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
    # by shape, not randn_like: the same seed must give the same noise whatever the memory layout
    # of the latents (the VAE returns channels-last ones, the latent cache contiguous ones)
    noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
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
        return self.noisy_batch_at(latents, noise, timesteps)

    def noisy_batch_at(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> NoisyBatch:
        """The noisy batch at given timesteps (integers 0..T-1) and noise: the validation loss's."""
        timesteps = timesteps.to(latents.device).long()
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        weights = None
        if self.snr_gamma:
            weights = min_snr_weights(self.scheduler, timesteps, self.snr_gamma, self.prediction_type)
        return NoisyBatch(noisy, target, timesteps, weights)


# --- rectified flow (SD3, Flux) -------------------------------------------------------------

def shift_sigmas(u: torch.Tensor, mu: float) -> torch.Tensor:
    """Move noise levels u in (0, 1) towards more noise: sigma = e^mu / (e^mu + 1/u - 1).

    With mu = ln(shift) this is SD3's static shift (Esser et al. 2024, eq. 23),
    shift * u / (1 + (shift - 1) * u); Flux takes mu from the image's token count.
    """
    return math.exp(mu) / (math.exp(mu) + 1 / u - 1)


def shift_mu(scheduler_config: Any, image_tokens: int) -> float:
    """The shift of the model's scheduler config: static `shift`, or Flux's resolution-dependent one
    (mu linear in the number of image tokens, between base_shift and max_shift)."""
    if scheduler_config.get("use_dynamic_shifting", False):
        return calculate_shift(image_tokens, scheduler_config["base_image_seq_len"],
                               scheduler_config["max_image_seq_len"], scheduler_config["base_shift"],
                               scheduler_config["max_shift"])
    return math.log(scheduler_config.get("shift", 1.0))


class FlowMatchObjective:
    """Rectified flow as SD3 and Flux were trained: x_t = (1 - sigma) x0 + sigma * noise, target
    noise - x0. Noise levels are drawn from diffusers' compute_density_for_timestep_sampling
    (logit-normal, mode or uniform) and shifted as the model's scheduler config says; losses are
    weighted per compute_loss_weighting_for_sd3 (none, sigma_sqrt, cosmap).

    u is used as the noise level itself, as in the SD3 paper: a positive logit_mean puts more
    training on noisier images. (diffusers' scripts index a descending sigma table with u, which
    turns the sign of logit_mean around.)
    """

    def __init__(self, scheduler_config: Any, weighting_scheme: str = "logit_normal", logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29, loss_weighting: str = "none",
                 noise_offset: float = 0.0, patch_size: int = 2):
        self.config = dict(scheduler_config)
        self.num_train_timesteps = self.config.get("num_train_timesteps", 1000)
        self.weighting_scheme = weighting_scheme
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.loss_weighting = loss_weighting
        self.noise_offset = noise_offset
        self.patch_size = patch_size

    def sample_sigmas(self, batch_size: int, image_tokens: int, device: torch.device | str = "cpu") -> torch.Tensor:
        u = compute_density_for_timestep_sampling(self.weighting_scheme, batch_size, self.logit_mean,
                                                  self.logit_std, self.mode_scale, device=device)
        u = u.clamp(1 / self.num_train_timesteps, 1.0)  # as fine as the model's own timestep grid
        return shift_sigmas(u, self.mu(image_tokens))

    def mu(self, image_tokens: int) -> float:
        """The shift (as mu = ln shift) for images of this many tokens."""
        return shift_mu(self.config, image_tokens)

    def noisy_batch(self, latents: torch.Tensor) -> NoisyBatch:
        image_tokens = (latents.shape[-2] // self.patch_size) * (latents.shape[-1] // self.patch_size)
        sigmas = self.sample_sigmas(latents.shape[0], image_tokens, latents.device)
        return self._at_sigmas(latents, offset_noise(latents, self.noise_offset), sigmas)

    def noisy_batch_at(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> NoisyBatch:
        """The noisy batch at given timesteps (sigma x num_train_timesteps) and noise: the validation loss's."""
        return self._at_sigmas(latents, noise, timesteps.to(latents.device).float() / self.num_train_timesteps)

    def _at_sigmas(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> NoisyBatch:
        s = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
        noisy = (1 - s) * latents + s * noise
        weights = None
        if self.loss_weighting != "none":
            weights = compute_loss_weighting_for_sd3(self.loss_weighting, sigmas)
        return NoisyBatch(noisy, noise - latents, sigmas * self.num_train_timesteps, weights, sigmas)
