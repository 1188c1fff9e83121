"""Z-Image: a single-stream DiT taking lists (one latent and one unpadded prompt per image),
Qwen3's penultimate hidden states of the chat-templated prompt, timestep 1 - sigma, and an output
that is minus the flow velocity (the pipeline negates it before stepping)."""

from __future__ import annotations

from typing import Any

import torch

try:
    from diffusers import ZImagePipeline
except (ImportError, RuntimeError):  # an older diffusers: the registry leaves Z-Image out
    ZImagePipeline = None

from ..objectives import NoisyBatch
from .base import DDPM_ONLY, LANGUAGE_MODEL_TEXT, Conditioning, FlowMatchingFamily

PROMPT_TOKENS = 512  # the Z-Image pipeline's max_sequence_length
ATTENTION = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
MLP = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def pad_prompts(embeddings: list[torch.Tensor], length: int) -> Conditioning:
    """Unpadded prompt features (one per prompt) as one tensor padded to `length`, with its mask:
    the text cache stores every caption's conditioning at one shape."""
    padded = embeddings[0].new_zeros(len(embeddings), length, embeddings[0].shape[-1])
    mask = torch.zeros(len(embeddings), length, dtype=torch.bool, device=padded.device)
    for row, features in enumerate(embeddings):
        padded[row, :len(features)] = features
        mask[row, :len(features)] = True
    return {"prompt_embeds": padded, "prompt_mask": mask}


class ZImage(FlowMatchingFamily):
    pipeline_class = ZImagePipeline
    pipeline_class_name = "ZImagePipeline"  # also when this diffusers lacks it
    label = "Z-Image"
    # diffusers' train_dreambooth_lora_z_image.py trains to_q/to_k/to_v/to_out.0 unless told otherwise
    lora_presets = {"attention": ATTENTION, "attention+mlp": ATTENTION + MLP}
    inapplicable_params = {**DDPM_ONLY, **LANGUAGE_MODEL_TEXT}
    trainable_text_attrs = ()
    # x (tokens x dim x 2 bytes) per main block (the 2 + 2 refiner blocks are in the fixed part); fitted to
    # Z-Image-Turbo at 1-30 blocks, 1024 px, 512 caption tokens (bench/memory_simulation.py)
    activation_fixed, activation_fixed_checkpointed, activation_saved_per_block = 74.52, 10.30, 1.0
    activation_per_block = {"n_layers": 34.09}

    @classmethod
    def base_model_metadata(cls, denoiser_config: dict[str, Any], prediction_type: str | None) -> dict[str, str]:
        return {"ss_base_model_version": "z_image", "ss_v2": "False", "modelspec.architecture": "z-image/lora",
                "modelspec.implementation": "https://github.com/Tongyi-MAI/Z-Image"}

    @property
    def prompt_length(self) -> int:
        return min(PROMPT_TOKENS, self.pipeline.tokenizer.model_max_length)

    @classmethod
    def prompt_tokens(cls, max_sequence_length: int) -> int:
        return PROMPT_TOKENS  # the longest a caption can be (each is fed unpadded)

    @classmethod
    def activation_unit(cls, config: dict[str, Any], resolution: int, text_tokens: int) -> float:
        tokens = (resolution // cls.resolution_multiple) ** 2 + text_tokens
        return tokens * config["dim"] * 2

    @classmethod
    def conditioning_shapes(cls, config: dict[str, Any], text_tokens: int) -> dict[str, tuple[int, ...]]:
        return {"prompt_embeds": (text_tokens, config["cap_feat_dim"])}  # no mask: every token a caption's

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        pipe = self.pipeline
        embeddings = pipe._encode_prompt(list(prompts), device=pipe.text_encoder.device,  # it rewrites the list
                                         max_sequence_length=self.prompt_length)
        return pad_prompts(embeddings, self.prompt_length)

    def eval_call_kwargs(self, guidance_scale: float) -> dict[str, Any]:
        return {**super().eval_call_kwargs(guidance_scale), "max_sequence_length": self.prompt_length}

    def predict(self, denoiser: torch.nn.Module, noisy: NoisyBatch, conditioning: Conditioning,
                batch: dict[str, Any]) -> torch.Tensor:
        latents = noisy.model_input
        embeds, masks = conditioning["prompt_embeds"], conditioning.get("prompt_mask")
        prompts = list(embeds.unbind(0)) if masks is None else [features[mask] for features, mask in zip(embeds, masks)]
        out = denoiser(list(latents.unsqueeze(2).unbind(0)), (1 - noisy.sigmas).to(latents.dtype), prompts,
                       return_dict=False)[0]
        return -torch.stack(out).squeeze(2)
