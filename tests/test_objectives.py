"""The noising, targets, loss weights and losses, each against a hand computation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers.training_utils import compute_snr

from diffusion_trainer.demo.tiny_models import ddpm_scheduler
from diffusion_trainer.families.sd import StableDiffusion
from diffusion_trainer.objectives import DDPMObjective, min_snr_weights, offset_noise, weighted_loss
from diffusion_trainer.params import parse_params

TIMESTEPS = torch.tensor([0, 10, 250, 500, 999])


def base(**overrides):
    return parse_params({"adaptor_name": "a", "model_name": "m/m", "dataset_name": "d", **overrides})[0]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_the_paper_on_known_timesteps(prediction_type):
    scheduler = ddpm_scheduler()
    gamma = 5.0
    snr = compute_snr(scheduler, TIMESTEPS)
    # compute_snr is alpha_bar / (1 - alpha_bar); check that, then the weights by hand
    alpha_bar = scheduler.alphas_cumprod[TIMESTEPS]
    assert torch.allclose(snr, alpha_bar / (1 - alpha_bar))
    expected = [min(s, gamma) / (s if prediction_type == "epsilon" else s + 1) for s in snr.tolist()]
    weights = min_snr_weights(scheduler, TIMESTEPS, gamma, prediction_type)
    assert weights.tolist() == pytest.approx(expected, rel=1e-6)
    # low-noise steps (huge SNR) are down-weighted; the noisiest keep (almost) full weight
    last = snr[-1].item()
    assert weights[0] < 0.01
    assert weights[-1].item() == pytest.approx(1.0 if prediction_type == "epsilon" else last / (last + 1), rel=1e-5)


def test_min_snr_weight_at_zero_snr_is_its_limit():
    scheduler = SimpleNamespace(alphas_cumprod=torch.tensor([0.5, 0.0]))
    assert min_snr_weights(scheduler, torch.tensor([1]), 5.0, "epsilon").tolist() == [1.0]


@pytest.mark.parametrize("raw", [{"snr_gamma": 5}, {"min_snr_gamma": 5}, {"snr_gamma": 5, "min_snr_gamma": 0}])
def test_snr_weighting_is_on_whichever_name_sets_it(raw, monkeypatch):
    """Predecessor fault: snr_gamma did nothing when min_snr_gamma was 0. The batch's weights are
    diffusers' compute_snr put through the paper's formula, min(SNR, 5) / SNR, at fixed timesteps."""
    params = base(**raw)
    objective = DDPMObjective(ddpm_scheduler().config, "epsilon", params.effective_snr_gamma)
    monkeypatch.setattr(torch, "randint", lambda *args, **kwargs: TIMESTEPS.clone())
    noisy = objective.noisy_batch(torch.randn(len(TIMESTEPS), 4, 8, 8))
    assert noisy.timesteps.tolist() == TIMESTEPS.tolist()
    snr = compute_snr(objective.scheduler, TIMESTEPS).tolist()
    expected = [min(s, 5.0) / s for s in snr]
    assert noisy.loss_weights is not None and noisy.loss_weights.tolist() == pytest.approx(expected, rel=1e-6)


def test_no_gamma_means_uniform_weights():
    noisy = DDPMObjective(ddpm_scheduler().config, "epsilon").noisy_batch(torch.randn(2, 4, 8, 8))
    assert noisy.loss_weights is None


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_noising_and_targets(prediction_type):
    objective = DDPMObjective(ddpm_scheduler().config, prediction_type)
    latents = torch.randn(4, 4, 8, 8)
    torch.manual_seed(3)
    noisy = objective.noisy_batch(latents)
    a = objective.scheduler.alphas_cumprod[noisy.timesteps].view(-1, 1, 1, 1)
    noise = (noisy.model_input - a.sqrt() * latents) / (1 - a).sqrt()
    torch.manual_seed(3)
    assert torch.allclose(noise, torch.randn_like(latents), atol=1e-4)  # x_t = sqrt(a) x0 + sqrt(1-a) eps
    if prediction_type == "epsilon":
        expected = noise
    else:
        expected = a.sqrt() * noise - (1 - a).sqrt() * latents  # v = sqrt(a) eps - sqrt(1-a) x0
    assert torch.allclose(noisy.target, expected, atol=1e-4)


def test_noise_offset_adds_a_per_sample_per_channel_constant():
    latents = torch.zeros(3, 4, 8, 8)
    torch.manual_seed(0)
    got = offset_noise(latents, 0.05)
    torch.manual_seed(0)
    expected = torch.randn_like(latents) + 0.05 * torch.randn(3, 4, 1, 1)
    assert torch.equal(got, expected)


def test_noise_offset_stays_a_fraction():
    """Predecessor fault: noise_offset was cast to int (0.05 became 0): the target noise of a
    Lab-string 0.05 must carry 0.05 x a per-sample, per-channel constant."""
    objective = DDPMObjective(ddpm_scheduler().config, "epsilon", noise_offset=base(noise_offset="0.05").noise_offset)
    torch.manual_seed(0)
    noisy = objective.noisy_batch(torch.zeros(3, 4, 8, 8))
    torch.manual_seed(0)
    expected = torch.randn(3, 4, 8, 8) + 0.05 * torch.randn(3, 4, 1, 1)
    assert torch.equal(noisy.target, expected)


def test_l2_loss_weights_each_sample_mean():
    prediction = torch.tensor([[1.0, 3.0], [0.0, 2.0]])
    target = torch.zeros(2, 2)
    # sample means of squares: (1 + 9) / 2 = 5 and (0 + 4) / 2 = 2; weights 0.5 and 2
    assert weighted_loss(prediction, target, torch.tensor([0.5, 2.0])).item() == pytest.approx((2.5 + 4) / 2)
    assert weighted_loss(prediction, target, None).item() == pytest.approx(3.5)


def test_huber_loss_is_the_pseudo_huber_with_c():
    c = 0.1
    prediction = torch.tensor([[0.0, 0.05, 1.0, -3.0]])
    target = torch.zeros(1, 4)
    expected = sum(2 * c * (math.sqrt(d * d + c * c) - c) for d in (0.0, 0.05, 1.0, -3.0)) / 4
    assert weighted_loss(prediction, target, None, "huber", c).item() == pytest.approx(expected, rel=1e-6)
    # small errors are almost squared, large ones almost linear (2c|d|)
    assert weighted_loss(torch.tensor([[1e-3]]), torch.zeros(1, 1), None, "huber", c).item() == pytest.approx(1e-6, rel=1e-3)
    assert weighted_loss(torch.tensor([[100.0]]), torch.zeros(1, 1), None, "huber", c).item() == pytest.approx(2 * c * 100, rel=1e-2)


def test_vae_shift_and_scale_are_applied_to_latents():
    """Predecessor fault: the VAE shift_factor (SD3, Flux) was ignored."""

    class Dist:
        def sample(self):
            return torch.full((1, 16, 2, 2), 1.0)

    vae = SimpleNamespace(config=SimpleNamespace(shift_factor=0.1159, scaling_factor=0.3611))
    family = StableDiffusion(SimpleNamespace(vae=vae), "any")
    assert torch.allclose(family.latents_from_distribution(Dist()), torch.full((1, 16, 2, 2), (1.0 - 0.1159) * 0.3611))
    vae = SimpleNamespace(config=SimpleNamespace(shift_factor=None, scaling_factor=0.18215))
    family = StableDiffusion(SimpleNamespace(vae=vae), "any")
    assert torch.allclose(family.latents_from_distribution(Dist()), torch.full((1, 16, 2, 2), 0.18215))


# --- rectified flow (SD3, Flux) ---------------------------------------------------------------

from diffusion_trainer.demo.tiny_models import flow_scheduler  # noqa: E402
from diffusion_trainer.objectives import FlowMatchObjective, shift_mu, shift_sigmas  # noqa: E402

SD3_SCHEDULER = flow_scheduler(shift=3.0).config
FLUX_SCHEDULER = flow_scheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                base_image_seq_len=256, max_image_seq_len=4096).config


def test_static_shift_is_sd3s_formula():
    u = torch.tensor([0.1, 0.25, 0.5, 0.9])
    expected = [3 * x / (1 + 2 * x) for x in u.tolist()]  # shift * u / (1 + (shift - 1) u)
    assert shift_sigmas(u, shift_mu(SD3_SCHEDULER, image_tokens=4096)).tolist() == pytest.approx(expected, rel=1e-6)


def test_flux_shift_grows_with_resolution():
    # mu is linear in image tokens: 0.5 at 256 tokens (512 px), 1.15 at 4096 (1024 px)
    assert shift_mu(FLUX_SCHEDULER, 256) == pytest.approx(0.5)
    assert shift_mu(FLUX_SCHEDULER, 4096) == pytest.approx(1.15)
    mu = 0.5 + 0.65 * (1024 - 256) / (4096 - 256)
    assert shift_mu(FLUX_SCHEDULER, 1024) == pytest.approx(mu)
    sigma = shift_sigmas(torch.tensor([0.5]), mu).item()
    assert sigma == pytest.approx(math.exp(mu) / (math.exp(mu) + 1))
    assert shift_sigmas(torch.tensor([0.5]), shift_mu(FLUX_SCHEDULER, 4096)).item() > sigma


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform"])
def test_noise_level_densities_are_the_sd3_papers(scheme):
    objective = FlowMatchObjective(flow_scheduler(shift=1.0).config, scheme, logit_mean=0.3, logit_std=0.8,
                                   mode_scale=1.29)
    torch.manual_seed(0)
    sigmas = objective.sample_sigmas(6, image_tokens=16)
    torch.manual_seed(0)
    if scheme == "logit_normal":
        expected = torch.sigmoid(torch.normal(0.3, 0.8, size=(6,)))
    elif scheme == "mode":
        u = torch.rand(6)
        expected = 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    else:
        expected = torch.rand(6)
    assert torch.allclose(sigmas, expected.clamp(1e-3, 1), atol=1e-6)  # shift 1 leaves them as drawn


def test_a_positive_logit_mean_trains_on_noisier_images():
    low, high = (FlowMatchObjective(SD3_SCHEDULER, logit_mean=m).sample_sigmas(4000, 1024) for m in (-1.0, 1.0))
    assert high.mean() > low.mean() + 0.2


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
def test_flow_noising_target_and_loss_weights(weighting):
    objective = FlowMatchObjective(SD3_SCHEDULER, "uniform", loss_weighting=weighting)
    latents = torch.randn(5, 16, 8, 8)
    torch.manual_seed(4)
    noisy = objective.noisy_batch(latents)
    s = noisy.sigmas.view(-1, 1, 1, 1)
    torch.manual_seed(4)
    u = torch.rand(5).clamp(1e-3, 1)
    noise = torch.randn_like(latents)
    assert torch.allclose(noisy.sigmas, 3 * u / (1 + 2 * u), atol=1e-6)
    assert torch.allclose(noisy.model_input, (1 - s) * latents + s * noise, atol=1e-5)  # x_t = (1-σ) x0 + σ ε
    assert torch.allclose(noisy.target, noise - latents, atol=1e-6)  # velocity ε - x0
    assert torch.allclose(noisy.timesteps, noisy.sigmas * 1000)
    sig = noisy.sigmas
    expected = {"none": None, "sigma_sqrt": sig ** -2.0, "cosmap": 2 / (math.pi * (1 - 2 * sig + 2 * sig ** 2))}[weighting]
    if expected is None:
        assert noisy.loss_weights is None
    else:
        assert torch.allclose(noisy.loss_weights, expected, rtol=1e-5)
