"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet, DDPM noise."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionPipeline

from ..objectives import DDPMObjective, NoisyBatch
from .base import FLOW_ONLY, Conditioning, ModelFamily
from .text import token_ids

# SD 2.x conditions on OpenCLIP ViT-H/14, 1024 wide; SD 1.x on CLIP ViT-L/14, 768 wide.
SD2_TEXT_WIDTH = 1024


def is_sd2(unet_config: dict[str, Any], prediction_type: str | None) -> bool:
    """SD 2.x or 1.x, from the width of the text the UNet attends to (its cross_attention_dim).
    Without a config, the v-prediction models are the 2.x ones (SD 2.x 768-v)."""
    width = unet_config.get("cross_attention_dim")
    if isinstance(width, (list, tuple)):
        width = width[0]
    if width is None:
        return prediction_type == "v_prediction"
    return width == SD2_TEXT_WIDTH


def modelspec_prediction(prediction_type: str | None) -> str:
    return "v" if prediction_type == "v_prediction" else "epsilon"


class StableDiffusion(ModelFamily):
    pipeline_class = StableDiffusionPipeline
    label = "Stable Diffusion 1.x/2.x"
    load_kwargs = {"safety_checker": None, "requires_safety_checker": False}
    inapplicable_params = FLOW_ONLY
    single_file_text_prefixes = {"text_encoder": "lora_te"}
    converts_lora_keys = True  # PEFT names the LoRA keys its own way; the SD loaders expect diffusers'
    activation_fixed, activation_fixed_checkpointed = 447.0, 104.6  # x (latent pixels x 320 x 2 bytes)

    def configure_objective(self, params: Any, prediction_type: str | None) -> None:
        prediction_type = prediction_type or "epsilon"
        self.objective = DDPMObjective(self.pipeline.scheduler.config, prediction_type,
                                       params.effective_snr_gamma, params.noise_offset)
        # Eval images must be sampled in the parameterisation the adapter was trained in.
        scheduler = self.pipeline.scheduler
        self.pipeline.scheduler = type(scheduler).from_config(scheduler.config, prediction_type=prediction_type)

    def encode_text(self, prompts: list[str], attrs: tuple[str, ...]) -> dict[str, torch.Tensor]:
        if "text_encoder" not in attrs:
            return {}
        encoder = self.pipeline.text_encoder
        ids = token_ids(self.pipeline.tokenizer, prompts).to(encoder.device)
        return {"text_encoder": encoder(ids)[0]}  # the last layer, as SD 1.x/2.x pipelines use

    def combine_text(self, parts: dict[str, torch.Tensor]) -> Conditioning:
        return {"encoder_hidden_states": parts["text_encoder"]}

    def predict(self, denoiser: torch.nn.Module, noisy: NoisyBatch, conditioning: Conditioning,
                batch: dict[str, Any]) -> torch.Tensor:
        return denoiser(noisy.model_input, noisy.timesteps,
                        encoder_hidden_states=conditioning["encoder_hidden_states"], return_dict=False)[0]

    @classmethod
    def base_model_metadata(cls, denoiser_config: dict[str, Any], prediction_type: str | None) -> dict[str, str]:
        v2 = is_sd2(denoiser_config, prediction_type)
        if not v2:
            architecture = "stable-diffusion-v1"
        else:
            architecture = "stable-diffusion-v2-768-v" if prediction_type == "v_prediction" else "stable-diffusion-v2-512"
        return {"ss_base_model_version": "sd_v2" if v2 else "sd_v1", "ss_v2": str(v2),
                "modelspec.architecture": f"{architecture}/lora", "modelspec.implementation": "diffusers",
                "modelspec.prediction_type": modelspec_prediction(prediction_type)}
