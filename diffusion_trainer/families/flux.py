"""Flux: packed 2x2 latents with position ids, CLIP pooled + T5 conditioning, a guidance input for
guidance-distilled models, and a resolution-dependent flow shift."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxPipeline

from ..objectives import NoisyBatch
from .base import DDPM_ONLY, JOINT_ATTENTION, JOINT_MLP, Conditioning, FlowMatchingFamily
from .text import clip_pooled, t5_hidden_states

T5_TOKENS = 512  # FLUX.1-dev's prompt length (schnell's tokenizer caps it at 256)


class Flux(FlowMatchingFamily):
    pipeline_class = FluxPipeline
    label = "Flux"
    text_encoder_attrs = ("text_encoder", "text_encoder_2")
    lora_presets = {"attention": JOINT_ATTENTION, "attention+mlp": JOINT_ATTENTION + JOINT_MLP}
    default_lora_layers = "attention+mlp"  # diffusers' Flux LoRA recipe trains the feed-forward layers too
    inapplicable_params = DDPM_ONLY
    # x (tokens x width x 2 bytes), per double-stream and single-stream block
    activation_fixed, activation_fixed_checkpointed, activation_saved_per_block = 13.18, 15.39, 0.837
    activation_per_block = {"num_layers": 25.21, "num_single_layers": 17.09}

    @classmethod
    def prompt_tokens(cls, max_sequence_length: int) -> int:
        return T5_TOKENS

    own_params = {"guidance_scale": "only guidance-distilled Flux models take a guidance input while training"}

    @classmethod
    def base_model_metadata(cls, denoiser_config: dict[str, Any], prediction_type: str | None) -> dict[str, str]:
        variant = "dev" if denoiser_config.get("guidance_embeds", True) else "schnell"
        return {"ss_base_model_version": "flux1", "ss_v2": "False",
                "modelspec.architecture": f"flux-1-{variant}/lora",
                "modelspec.implementation": "https://github.com/black-forest-labs/flux"}

    def configure_objective(self, params: Any, prediction_type: str | None) -> None:
        super().configure_objective(params, prediction_type)
        self.guidance = params.guidance_scale if self.denoiser.config.guidance_embeds else None

    def inapplicable_notes(self, params: Any) -> list[str]:
        notes = super().inapplicable_notes(params)
        if not self.denoiser.config.guidance_embeds and params.guidance_scale != 1.0:
            notes.append(f"guidance_scale={params.guidance_scale} does not apply: this Flux model has no "
                         "guidance input (it is not guidance-distilled, e.g. FLUX.1-schnell).")
        return notes

    def encode_text(self, prompts: list[str], attrs: tuple[str, ...]) -> dict[str, torch.Tensor]:
        pipe, parts = self.pipeline, {}
        if "text_encoder" in attrs:
            parts["text_encoder.pooled"] = clip_pooled(pipe.tokenizer, pipe.text_encoder, prompts)
        if "text_encoder_2" in attrs:
            t5_tokens = min(T5_TOKENS, pipe.tokenizer_2.model_max_length)
            parts["text_encoder_2"] = t5_hidden_states(pipe.tokenizer_2, pipe.text_encoder_2, prompts, t5_tokens)
        return parts

    def combine_text(self, parts: dict[str, torch.Tensor]) -> Conditioning:
        return {"pooled_projections": parts["text_encoder.pooled"], "encoder_hidden_states": parts["text_encoder_2"]}

    def predict(self, denoiser: torch.nn.Module, noisy: NoisyBatch, conditioning: Conditioning,
                batch: dict[str, Any]) -> torch.Tensor:
        latents = noisy.model_input
        b, c, h, w = latents.shape
        text = conditioning["encoder_hidden_states"]
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((b,), self.guidance, device=latents.device, dtype=latents.dtype)
        packed = denoiser(
            hidden_states=FluxPipeline._pack_latents(latents, b, c, h, w),
            timestep=noisy.sigmas.to(latents.dtype),  # Flux takes the noise level in [0, 1]
            guidance=guidance,
            pooled_projections=conditioning["pooled_projections"],
            encoder_hidden_states=text,
            txt_ids=text.new_zeros(text.shape[1], 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype),
            return_dict=False)[0]
        scale = self.pipeline.vae_scale_factor
        return FluxPipeline._unpack_latents(packed, h * scale, w * scale, scale)
