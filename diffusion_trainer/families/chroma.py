"""Chroma: Flux's packed 2x2 latents, VAE and flow shift, conditioned on T5 alone (no CLIP pooled
vector, no guidance input) with the pipeline's text mask (all but the first padding token hidden)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxPipeline

try:
    from diffusers import ChromaPipeline
except (ImportError, RuntimeError):  # an older diffusers: the registry leaves Chroma out
    ChromaPipeline = None

from ..objectives import NoisyBatch
from .base import DDPM_ONLY, JOINT_ATTENTION, JOINT_MLP, LANGUAGE_MODEL_TEXT, Conditioning, FlowMatchingFamily

T5_TOKENS = 512  # the Chroma pipeline's max_sequence_length
APPROXIMATOR = "distilled_guidance_layer."


class Chroma(FlowMatchingFamily):
    pipeline_class = ChromaPipeline
    pipeline_class_name = "ChromaPipeline"  # also when this diffusers lacks it
    label = "Chroma"
    lora_presets = {"attention": JOINT_ATTENTION, "attention+mlp": JOINT_ATTENTION + JOINT_MLP}
    default_lora_layers = "attention+mlp"  # Flux's recipe: Chroma is a Flux-architecture model
    inapplicable_params = {**DDPM_ONLY, **LANGUAGE_MODEL_TEXT}
    trainable_text_attrs = ()
    # x (tokens x width x 2 bytes), per double- and single-stream block (as Flux's, with the text mask);
    # fitted to Chroma1-HD at 1-19 double / 1-38 single blocks, 1024 px (bench/memory_simulation.py)
    activation_fixed, activation_fixed_checkpointed, activation_saved_per_block = 12.55, 15.68, 0.811
    activation_per_block = {"num_layers": 26.71, "num_single_layers": 18.58}

    @classmethod
    def base_model_metadata(cls, denoiser_config: dict[str, Any], prediction_type: str | None) -> dict[str, str]:
        return {"ss_base_model_version": "chroma", "ss_v2": "False", "modelspec.architecture": "chroma/lora",
                "modelspec.implementation": "https://huggingface.co/lodestones/Chroma"}

    def lora_targets(self, layers: str) -> tuple[str, ...]:
        """all-linear leaves out the distilled guidance layer (the small network that makes the
        modulation from the timestep): ComfyUI's Flux key map, which Chroma's LoRAs go through, has no
        name for it, so a single file holding it would not load whole."""
        targets = super().lora_targets(layers)
        return tuple(name for name in targets if not name.startswith(APPROXIMATOR))

    @classmethod
    def prompt_tokens(cls, max_sequence_length: int) -> int:
        return T5_TOKENS

    @classmethod
    def conditioning_shapes(cls, config: dict[str, Any], text_tokens: int) -> dict[str, tuple[int, ...]]:
        return {"encoder_hidden_states": (text_tokens, config["joint_attention_dim"]), "text_mask": (text_tokens,)}

    @property
    def t5_tokens(self) -> int:
        return min(T5_TOKENS, self.pipeline.tokenizer.model_max_length)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        encoder = self.pipeline.text_encoder
        text, mask = self.pipeline._get_t5_prompt_embeds(
            list(prompts), max_sequence_length=self.t5_tokens, device=encoder.device, dtype=encoder.dtype)
        return {"encoder_hidden_states": text, "text_mask": mask}

    def eval_call_kwargs(self, guidance_scale: float) -> dict[str, Any]:
        return {**super().eval_call_kwargs(guidance_scale), "max_sequence_length": self.t5_tokens}

    def predict(self, denoiser: torch.nn.Module, noisy: NoisyBatch, conditioning: Conditioning,
                batch: dict[str, Any]) -> torch.Tensor:
        latents = noisy.model_input
        b, c, h, w = latents.shape
        text = conditioning["encoder_hidden_states"]
        image_tokens = (h // 2) * (w // 2)
        packed = denoiser(
            hidden_states=FluxPipeline._pack_latents(latents, b, c, h, w),
            timestep=noisy.sigmas.to(latents.dtype),  # the pipeline's timestep / 1000
            encoder_hidden_states=text,
            txt_ids=text.new_zeros(text.shape[1], 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype),
            attention_mask=self.pipeline._prepare_attention_mask(b, image_tokens, latents.dtype,
                                                                 conditioning["text_mask"].to(latents.dtype)),
            return_dict=False)[0]
        scale = self.pipeline.vae_scale_factor
        return FluxPipeline._unpack_latents(packed, h * scale, w * scale, scale)
