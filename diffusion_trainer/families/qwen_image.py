"""Qwen-Image: an MMDiT over packed 2x2 latents of a 3D (video-style) VAE normalised per channel
by its latents_mean/std, conditioned on Qwen2.5-VL's last hidden states of the templated prompt
(the template's opening dropped) with their mask."""

from __future__ import annotations

from typing import Any

import torch

try:
    from diffusers import QwenImagePipeline
except (ImportError, RuntimeError):  # older diffusers or transformers (no Qwen2.5-VL): left out
    QwenImagePipeline = None
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ..objectives import NoisyBatch
from .base import DDPM_ONLY, JOINT_ATTENTION, LANGUAGE_MODEL_TEXT, Conditioning, FlowMatchingFamily

PROMPT_TOKENS = 512  # the Qwen-Image pipeline's max_sequence_length
MLP = ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")


class QwenImage(FlowMatchingFamily):
    pipeline_class = QwenImagePipeline
    pipeline_class_name = "QwenImagePipeline"  # also when this diffusers lacks it
    label = "Qwen-Image"
    # diffusers' train_dreambooth_lora_qwen_image.py trains to_k/to_q/to_v/to_out.0 unless told otherwise
    lora_presets = {"attention": ("to_k", "to_q", "to_v", "to_out.0"), "attention+mlp": JOINT_ATTENTION + MLP}
    inapplicable_params = {**DDPM_ONLY, **LANGUAGE_MODEL_TEXT}
    trainable_text_attrs = ()
    # x (tokens x width x 2 bytes) per block; fitted to Qwen-Image at 1-60 blocks, 1024 px, 512 caption tokens
    # (bench/memory_simulation.py)
    activation_fixed, activation_fixed_checkpointed, activation_saved_per_block = 12.19, 14.75, 1.0
    activation_per_block = {"num_layers": 21.66}

    @classmethod
    def base_model_metadata(cls, denoiser_config: dict[str, Any], prediction_type: str | None) -> dict[str, str]:
        return {"ss_base_model_version": "qwen_image", "ss_v2": "False", "modelspec.architecture": "qwen-image/lora",
                "modelspec.implementation": "https://github.com/QwenLM/Qwen-Image"}

    @classmethod
    def prompt_tokens(cls, max_sequence_length: int) -> int:
        return PROMPT_TOKENS  # the longest a caption can be: predict trims to the batch's longest

    @classmethod
    def latent_shape(cls, vae_config: dict[str, Any], resolution: int) -> tuple[int, int, int]:
        return vae_config["z_dim"], resolution // 8, resolution // 8

    @classmethod
    def conditioning_shapes(cls, config: dict[str, Any], text_tokens: int) -> dict[str, tuple[int, ...]]:
        return {"encoder_hidden_states": (text_tokens, config["joint_attention_dim"])}  # no mask: all real

    # --- the 3D VAE: one frame per image, latents (x - mean) / std per channel ----------------
    @property
    def latent_channels(self) -> int:
        return self.vae_config.z_dim

    @property
    def vae_downscale(self) -> int:
        return 2 ** len(self.vae_config.temperal_downsample)

    def posterior(self, pixels: torch.Tensor) -> Any:
        frames = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype).unsqueeze(2)).latent_dist
        return DiagonalGaussianDistribution(frames.parameters.squeeze(2))

    def latents_from_distribution(self, latent_dist: Any) -> torch.Tensor:
        latents = latent_dist.sample()
        shape = (1, self.latent_channels, 1, 1)
        mean = torch.tensor(self.vae_config.latents_mean).view(shape).to(latents)
        std = torch.tensor(self.vae_config.latents_std).view(shape).to(latents)
        return (latents - mean) / std

    # --- text ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """The pipeline's own prompt features, padded to PROMPT_TOKENS so every caption's have one
        shape (the text cache stores them so); predict trims them back as the pipeline batches them."""
        pipe = self.pipeline
        text, mask = pipe.encode_prompt(list(prompts), device=pipe.text_encoder.device,
                                        max_sequence_length=PROMPT_TOKENS)
        if mask is None:  # every prompt as long as the longest
            mask = torch.ones(text.shape[:2], dtype=torch.long, device=text.device)
        pad = PROMPT_TOKENS - text.shape[1]
        return {"encoder_hidden_states": torch.nn.functional.pad(text, (0, 0, 0, pad)),
                "encoder_hidden_states_mask": torch.nn.functional.pad(mask, (0, pad))}

    def predict(self, denoiser: torch.nn.Module, noisy: NoisyBatch, conditioning: Conditioning,
                batch: dict[str, Any]) -> torch.Tensor:
        latents = noisy.model_input
        b, c, h, w = latents.shape
        text, mask = conditioning["encoder_hidden_states"], conditioning.get("encoder_hidden_states_mask")
        if mask is not None:  # without one every token is a caption's (the memory simulation's input)
            length = int(mask.sum(dim=1).max())
            text, mask = text[:, :length], mask[:, :length]
            mask = None if mask.all() else mask  # as the pipeline passes a full mask
        packed = denoiser(
            hidden_states=QwenImagePipeline._pack_latents(latents, b, c, h, w),
            timestep=noisy.sigmas.to(latents.dtype),  # the pipeline's timestep / 1000
            encoder_hidden_states=text,
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False)[0]
        scale = self.pipeline.vae_scale_factor
        return QwenImagePipeline._unpack_latents(packed, h * scale, w * scale, scale).squeeze(2)

    def eval_call_kwargs(self, guidance_scale: float) -> dict[str, Any]:
        """Qwen-Image's classifier-free guidance is true_cfg_scale, on only with a negative prompt;
        the pipeline's own default is none. An eval_guidance_scale turns it on (negative prompt " ")."""
        return {"true_cfg_scale": guidance_scale, "negative_prompt": " "} if guidance_scale else {}
