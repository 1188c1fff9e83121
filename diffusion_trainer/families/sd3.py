"""Stable Diffusion 3: MMDiT transformer, two CLIP encoders and an optional T5, rectified flow."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import StableDiffusion3Pipeline

from ..objectives import NoisyBatch
from .base import Conditioning, FlowMatchingFamily
from .text import clip_penultimate_and_pooled, t5_hidden_states

T5_TOKENS = 77  # diffusers' SD3 LoRA recipe; the zeros that stand in for T5 are as long as a CLIP prompt


def sd3_model_type(transformer_config: dict[str, Any]) -> str:
    """kohya's name for the SD3 variant: "l" (3.5 Large, 38 blocks), "m3.5" (3.5 Medium, whose
    blocks have a second self-attention) or "m" (3 Medium)."""
    if transformer_config.get("num_layers", 24) >= 38:
        return "l"
    return "m3.5" if transformer_config.get("dual_attention_layers") else "m"


class StableDiffusion3(FlowMatchingFamily):
    pipeline_class = StableDiffusion3Pipeline
    label = "Stable Diffusion 3"
    text_encoder_attrs = ("text_encoder", "text_encoder_2", "text_encoder_3")
    lora_target_modules = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                           "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")

    @classmethod
    def base_model_metadata(cls, denoiser_config: dict[str, Any], prediction_type: str | None) -> dict[str, str]:
        model_type = sd3_model_type(denoiser_config)
        return {"ss_base_model_version": model_type, "ss_v2": "False",
                "modelspec.architecture": f"stable-diffusion-3-{model_type}/lora",
                "modelspec.implementation": "diffusers"}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        pipe = self.pipeline
        hidden_1, pooled_1 = clip_penultimate_and_pooled(pipe.tokenizer, pipe.text_encoder, prompts)
        hidden_2, pooled_2 = clip_penultimate_and_pooled(pipe.tokenizer_2, pipe.text_encoder_2, prompts)
        clip = torch.cat([hidden_1, hidden_2], dim=-1)
        width = self.denoiser.config.joint_attention_dim
        if pipe.text_encoder_3 is not None:
            t5 = t5_hidden_states(pipe.tokenizer_3, pipe.text_encoder_3, prompts,
                                  min(T5_TOKENS, pipe.tokenizer_3.model_max_length))
        else:  # a pipeline saved without T5 trains on zeros in its place, as the SD3 pipeline samples
            t5 = clip.new_zeros(len(prompts), pipe.tokenizer_max_length, width)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2),
                "pooled_projections": torch.cat([pooled_1, pooled_2], dim=-1)}

    def predict(self, denoiser: torch.nn.Module, noisy: NoisyBatch, conditioning: Conditioning,
                batch: dict[str, Any]) -> torch.Tensor:
        return denoiser(hidden_states=noisy.model_input, timestep=noisy.timesteps,
                        encoder_hidden_states=conditioning["encoder_hidden_states"],
                        pooled_projections=conditioning["pooled_projections"], return_dict=False)[0]
