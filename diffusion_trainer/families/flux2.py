"""FLUX.2: dev (Mistral 3 text encoder, guidance input) and klein (Qwen3, real CFG when sampling).

What the transformer sees, as Flux2Pipeline / Flux2KleinPipeline feed it (diffusers 0.42) and
diffusers' train_dreambooth_lora_flux2*.py train it: the VAE's mode latents, 2x2-patchified to
4 x 32 channels and normalised by the VAE's batch-norm statistics, packed to a token sequence with
(t, h, w, l) position ids; the prompt embedding the pipeline's own `encode_prompt` makes (three
hidden layers of the text encoder side by side, 512 tokens); the noise level in [0, 1]. Noise
levels are shifted as the pipeline samples at its default 50 steps (`compute_empirical_mu`, from
the image's token count). Where the klein script and pipeline differ (the script's default text
layers are dev's 10, 20, 30; the klein pipeline reads 9, 18, 27), the pipeline's are used, since
they are what eval images and users sample with.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    from diffusers import Flux2KleinPipeline, Flux2Pipeline
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
except ImportError:  # diffusers before 0.37 has no FLUX.2 [klein]: the registry leaves both out
    Flux2Pipeline = Flux2KleinPipeline = None

from ..objectives import FlowMatchObjective, NoisyBatch
from .base import DDPM_ONLY, JOINT_ATTENTION, LANGUAGE_MODEL_TEXT, Conditioning, FlowMatchingFamily

# The single-stream blocks fuse attention and MLP: one projection in (q, k, v and the MLP's input)
# and one out, so any attention LoRA on them trains their MLP too (diffusers' FLUX.2 recipe).
SINGLE_STREAM = ("attn.to_qkv_mlp_proj", "attn.to_out")
DOUBLE_STREAM_MLP = ("ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out")
PROMPT_TOKENS = 512  # encode_prompt pads every prompt to its max_sequence_length, 512
SAMPLING_STEPS = 50  # the pipelines' default num_inference_steps, whose shift training follows
MIN_DIFFUSERS = "0.37"  # the first with Flux2KleinPipeline


class Flux2FlowObjective(FlowMatchObjective):
    """Rectified flow on FLUX.2's patchified latents, shifted as the pipeline samples: mu =
    compute_empirical_mu(image tokens, 50 steps) (it replaces the scheduler config's shift)."""

    def mu(self, image_tokens: int) -> float:
        return compute_empirical_mu(image_tokens, SAMPLING_STEPS)


class Flux2(FlowMatchingFamily):
    pipeline_class = Flux2Pipeline
    pipeline_class_name = "Flux2Pipeline"  # also when this diffusers lacks it
    label = "FLUX.2"
    lora_presets = {"attention": JOINT_ATTENTION + SINGLE_STREAM,
                    "attention+mlp": JOINT_ATTENTION + SINGLE_STREAM + DOUBLE_STREAM_MLP}
    inapplicable_params = {**DDPM_ONLY, **LANGUAGE_MODEL_TEXT}
    trainable_text_attrs = ()
    own_params = {"guidance_scale": "only guidance-distilled models (FLUX.1-dev, FLUX.2-dev) take a guidance "
                                    "input while training"}
    single_file_form = "bfl"  # ComfyUI's own (BFL) module names, see export.py
    # x (tokens x width x 2 bytes) per double- and single-stream block; fitted to FLUX.2-dev's widths at 1-8
    # double / 1-48 single blocks, 1024 px (bench/memory_simulation.py); klein's widths agree within 1 %.
    activation_fixed, activation_fixed_checkpointed, activation_saved_per_block = 19.64, 21.45, 1.0
    activation_per_block = {"num_layers": 25.12, "num_single_layers": 26.11}
    # Component names for the memory plan: transformer (FLUX.2-dev 32 B), text_encoder (Mistral 3
    # Small 24 B; klein: Qwen3 4 B / 8 B), vae (AutoencoderKLFlux2, its `bn` statistics kept here).

    @classmethod
    def prompt_tokens(cls, max_sequence_length: int) -> int:
        return PROMPT_TOKENS

    @classmethod
    def latent_shape(cls, vae_config: dict[str, Any], resolution: int) -> tuple[int, int, int]:
        return 4 * vae_config["latent_channels"], resolution // 16, resolution // 16  # 2x2-patchified

    @classmethod
    def conditioning_shapes(cls, config: dict[str, Any], text_tokens: int) -> dict[str, tuple[int, ...]]:
        return {"encoder_hidden_states": (text_tokens, config["joint_attention_dim"])}

    def __init__(self, pipeline, source: str):
        super().__init__(pipeline, source)
        bn = pipeline.vae.bn  # kept: the latent cache frees the VAE, its statistics are still needed
        self.bn_mean = bn.running_mean.detach().float().cpu().view(1, -1, 1, 1)
        variance = bn.running_var.detach().float().cpu() + self.vae_config.batch_norm_eps
        self.bn_std = torch.sqrt(variance).view(1, -1, 1, 1)
        self.guidance: float | None = None

    @classmethod
    def base_model_metadata(cls, denoiser_config: dict[str, Any], prediction_type: str | None) -> dict[str, str]:
        variant = "dev" if denoiser_config.get("guidance_embeds", True) else "klein"
        return {"ss_base_model_version": "flux2", "ss_v2": "False",
                "modelspec.architecture": f"flux-2-{variant}/lora",
                "modelspec.implementation": "https://github.com/black-forest-labs/flux2"}

    def lora_targets(self, layers: str) -> tuple[str, ...]:
        """Full names: `attn.to_out` is a linear layer in single-stream blocks but a ModuleList in
        double-stream ones, which a suffix would also match."""
        suffixes = super().lora_targets(layers)
        return tuple(name for name, module in self.denoiser.named_modules() if isinstance(module, torch.nn.Linear)
                     and any(name == s or name.endswith("." + s) for s in suffixes))

    def configure_objective(self, params: Any, prediction_type: str | None) -> None:
        self.objective = Flux2FlowObjective(
            self.pipeline.scheduler.config, params.weighting_scheme, params.logit_mean, params.logit_std,
            params.mode_scale, params.flow_loss_weighting, params.noise_offset, patch_size=1)
        self.guidance = params.guidance_scale if self.denoiser.config.guidance_embeds else None

    def latents_from_distribution(self, latent_dist: Any) -> torch.Tensor:
        """The posterior's mode (as the pipeline encodes images and the reference script trains),
        2x2-patchified and batch-norm normalised."""
        latents = self.pipeline_class._patchify_latents(latent_dist.mode())
        mean, std = (t.to(latents.device, latents.dtype) for t in (self.bn_mean, self.bn_std))
        return (latents - mean) / std

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        encoder = self.pipeline.text_encoder
        embeds, _ = self.pipeline.encode_prompt(prompts, device=encoder.device)
        return {"encoder_hidden_states": embeds}

    def predict(self, denoiser: torch.nn.Module, noisy: NoisyBatch, conditioning: Conditioning,
                batch: dict[str, Any]) -> torch.Tensor:
        latents = noisy.model_input
        b, c, h, w = latents.shape
        text = conditioning["encoder_hidden_states"]
        guidance = None
        if self.guidance is not None:  # float32, as the pipeline passes it
            guidance = torch.full((b,), self.guidance, device=latents.device, dtype=torch.float32)
        packed = denoiser(
            hidden_states=self.pipeline_class._pack_latents(latents),
            timestep=noisy.sigmas.to(latents.dtype),  # the pipeline passes t / 1000, the noise level
            guidance=guidance,
            encoder_hidden_states=text,
            txt_ids=self.pipeline_class._prepare_text_ids(text).to(latents.device),
            img_ids=self.pipeline_class._prepare_latent_ids(latents).to(latents.device),
            return_dict=False)[0]
        return packed.transpose(1, 2).reshape(b, c, h, w)  # tokens are in row-major (h, w) order


class Flux2Klein(Flux2):
    pipeline_class = Flux2KleinPipeline
    pipeline_class_name = "Flux2KleinPipeline"
    label = "FLUX.2 [klein]"
    own_params = {}  # no guidance input: guidance_scale is named as not applying
