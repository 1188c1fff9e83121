"""Stable Diffusion XL: two CLIP encoders, pooled text embedding and size/crop micro-conditioning."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline

from ..objectives import NoisyBatch
from .base import Conditioning
from .sd import StableDiffusion, modelspec_prediction
from .text import clip_penultimate_and_pooled


def micro_conditioning(batch: dict[str, Any]) -> torch.Tensor:
    """SDXL's time ids per sample: original (h, w), crop (top, left), target (h, w), in that
    order (Podell et al. 2023, sec. 2.2), from what the loader really did to each image."""
    return torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=1)


class StableDiffusionXL(StableDiffusion):
    pipeline_class = StableDiffusionXLPipeline
    label = "Stable Diffusion XL"
    load_kwargs = {}
    text_encoder_attrs = ("text_encoder", "text_encoder_2")
    trainable_text_attrs = ("text_encoder", "text_encoder_2")
    single_file_text_prefixes = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    activation_fixed, activation_fixed_checkpointed = 744.6, 68.7

    @classmethod
    def base_model_metadata(cls, denoiser_config: dict[str, Any], prediction_type: str | None) -> dict[str, str]:
        return {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False",
                "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
                "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
                "modelspec.prediction_type": modelspec_prediction(prediction_type)}

    def encode_text(self, prompts: list[str], attrs: tuple[str, ...]) -> dict[str, torch.Tensor]:
        pipe, parts = self.pipeline, {}
        if "text_encoder" in attrs:
            parts["text_encoder"], _ = clip_penultimate_and_pooled(pipe.tokenizer, pipe.text_encoder, prompts)
        if "text_encoder_2" in attrs:
            parts["text_encoder_2"], parts["text_encoder_2.pooled"] = clip_penultimate_and_pooled(
                pipe.tokenizer_2, pipe.text_encoder_2, prompts)
        return parts

    def combine_text(self, parts: dict[str, torch.Tensor]) -> Conditioning:
        return {"encoder_hidden_states": torch.cat([parts["text_encoder"], parts["text_encoder_2"]], dim=-1),
                "text_embeds": parts["text_encoder_2.pooled"]}

    def predict(self, denoiser: torch.nn.Module, noisy: NoisyBatch, conditioning: Conditioning,
                batch: dict[str, Any]) -> torch.Tensor:
        time_ids = micro_conditioning(batch).to(noisy.model_input.device, conditioning["text_embeds"].dtype)
        return denoiser(noisy.model_input, noisy.timesteps,
                        encoder_hidden_states=conditioning["encoder_hidden_states"],
                        added_cond_kwargs={"text_embeds": conditioning["text_embeds"], "time_ids": time_ids},
                        return_dict=False)[0]
