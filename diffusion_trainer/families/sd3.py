"""Stable Diffusion 3: MMDiT transformer, two CLIP encoders and an optional T5, rectified flow."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import StableDiffusion3Pipeline

from ..objectives import NoisyBatch
from .base import DDPM_ONLY, JOINT_ATTENTION, JOINT_MLP, Conditioning, FlowMatchingFamily
from .text import clip_penultimate_and_pooled, t5_hidden_states


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
    trainable_text_attrs = ("text_encoder", "text_encoder_2")
    lora_presets = {"attention": JOINT_ATTENTION, "attention+mlp": JOINT_ATTENTION + JOINT_MLP}
    inapplicable_params = DDPM_ONLY
    own_params = {"max_sequence_length": "only SD3's T5 prompt length is set by it (Flux uses 512)"}
    max_sequence_length = 77  # T5 tokens; set from the run's parameters
    # x (tokens x width x 2 bytes); a dual-attention block (3.5 Medium) costs its second attention more
    activation_fixed, activation_fixed_checkpointed, activation_saved_per_block = 8.48, 6.0, 1.053
    activation_per_block = {"num_layers": 22.19, "dual_attention_layers": 3.4}

    @classmethod
    def prompt_tokens(cls, max_sequence_length: int) -> int:
        return 77 + max_sequence_length  # CLIP's 77, then T5's

    @classmethod
    def block_counts(cls, config: dict[str, Any]) -> dict[str, int]:
        return {"num_layers": config.get("num_layers", 24), "dual_attention_layers": len(config.get("dual_attention_layers") or ())}

    @classmethod
    def largest_block_units(cls, counts: dict[str, int]) -> float:
        dual = cls.activation_per_block["dual_attention_layers"] if counts["dual_attention_layers"] else 0.0
        return cls.activation_per_block["num_layers"] + dual

    def configure_objective(self, params: Any, prediction_type: str | None) -> None:
        super().configure_objective(params, prediction_type)
        self.max_sequence_length = params.max_sequence_length

    @classmethod
    def base_model_metadata(cls, denoiser_config: dict[str, Any], prediction_type: str | None) -> dict[str, str]:
        model_type = sd3_model_type(denoiser_config)
        return {"ss_base_model_version": model_type, "ss_v2": "False",
                "modelspec.architecture": f"stable-diffusion-3-{model_type}/lora",
                "modelspec.implementation": "diffusers"}

    def encode_text(self, prompts: list[str], attrs: tuple[str, ...]) -> dict[str, torch.Tensor]:
        pipe, parts = self.pipeline, {}
        for attr, tokenizer in (("text_encoder", pipe.tokenizer), ("text_encoder_2", pipe.tokenizer_2)):
            if attr in attrs:
                parts[attr], parts[f"{attr}.pooled"] = clip_penultimate_and_pooled(tokenizer, getattr(pipe, attr), prompts)
        if "text_encoder_3" in attrs:
            if pipe.text_encoder_3 is not None:
                parts["text_encoder_3"] = t5_hidden_states(pipe.tokenizer_3, pipe.text_encoder_3, prompts,
                                                           self.max_sequence_length)
            else:  # without T5, the zeros the installed SD3 pipeline samples with (their length varies by version)
                clip = pipe.text_encoder
                parts["text_encoder_3"] = pipe._get_t5_prompt_embeds(
                    prompts, max_sequence_length=self.max_sequence_length, device=clip.device, dtype=clip.dtype)
        return parts

    def combine_text(self, parts: dict[str, torch.Tensor]) -> Conditioning:
        clip = torch.cat([parts["text_encoder"], parts["text_encoder_2"]], dim=-1)
        t5 = parts["text_encoder_3"]
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2),
                "pooled_projections": torch.cat([parts["text_encoder.pooled"], parts["text_encoder_2.pooled"]], dim=-1)}

    def eval_call_kwargs(self, guidance_scale: float) -> dict[str, Any]:
        return {**super().eval_call_kwargs(guidance_scale), "max_sequence_length": self.max_sequence_length}

    def predict(self, denoiser: torch.nn.Module, noisy: NoisyBatch, conditioning: Conditioning,
                batch: dict[str, Any]) -> torch.Tensor:
        return denoiser(hidden_states=noisy.model_input, timestep=noisy.timesteps,
                        encoder_hidden_states=conditioning["encoder_hidden_states"],
                        pooled_projections=conditioning["pooled_projections"], return_dict=False)[0]
