"""The model-family interface: everything that differs between architectures, and nothing else.

A family wraps a loaded diffusers pipeline. The loop asks it to encode prompts and images,
to make the noisy input and target, to run the denoiser, and to save the adapter. Facts
about a family are class attributes (pipeline class, denoiser attribute, LoRA targets…),
so most families override only what their architecture really does differently.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline
from peft.utils import get_peft_model_state_dict

from ..errors import InputError
from ..objectives import NoisyBatch

Conditioning = dict[str, torch.Tensor]


class ModelFamily(ABC):
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    label: ClassVar[str]  # for people: "Stable Diffusion 1.x/2.x"
    denoiser_attr: ClassVar[str] = "unet"
    # The keyword the pipeline's save_lora_weights takes for the denoiser: unet_lora_layers…
    lora_save_prefix: ClassVar[str] = "unet"
    lora_target_modules: ClassVar[tuple[str, ...]] = ("to_k", "to_q", "to_v", "to_out.0")
    resolution_multiple: ClassVar[int] = 8
    text_encoder_attrs: ClassVar[tuple[str, ...]] = ("text_encoder",)
    # Extra from_pretrained keywords (e.g. skip SD's safety checker).
    load_kwargs: ClassVar[dict[str, Any]] = {}
    # Parameters with no meaning for this family, and why: logged once at the start of a run.
    inapplicable_params: ClassVar[dict[str, str]] = {}

    def __init__(self, pipeline: DiffusionPipeline, source: str):
        self.pipeline = pipeline
        self.source = source  # hub id or path it was loaded from
        self.objective: Any = None  # set by configure_objective

    # --- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, source: str, weight_dtype: torch.dtype) -> "ModelFamily":
        """Load the pipeline from a hub id or local folder: safetensors only, no remote code."""
        try:
            pipeline = cls.pipeline_class.from_pretrained(
                source, torch_dtype=weight_dtype, use_safetensors=True, **cls.load_kwargs)
        except (OSError, ValueError) as exc:  # no safetensors, missing parts, unreachable hub
            raise InputError(f"model_name: could not load {cls.label} pipeline '{source}' with safetensors "
                             f"weights ({type(exc).__name__}: {exc}).") from None
        pipeline.set_progress_bar_config(disable=True)
        family = cls(pipeline, source)
        family.keep_vae_stable(weight_dtype)
        return family

    def keep_vae_stable(self, weight_dtype: torch.dtype) -> None:
        # VAEs flagged force_upcast overflow in fp16 (SDXL's does); keep them in fp32 then.
        if weight_dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False):
            self.vae.to(dtype=torch.float32)

    # --- components ------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipeline, self.denoiser_attr)

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipeline.vae

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (getattr(self.pipeline, a, None) for a in self.text_encoder_attrs) if m is not None]

    @property
    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.vae, *self.text_encoders]

    def model_prediction_type(self) -> str | None:
        """The prediction type the base model was trained with, if it has one."""
        return getattr(self.pipeline.scheduler.config, "prediction_type", None)

    # --- training --------------------------------------------------------------------------
    @abstractmethod
    def configure_objective(self, params: Any, prediction_type: str | None) -> None:
        """Choose and set up self.objective from the run's parameters."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Text conditioning for a batch of prompts; every tensor has the batch as dim 0."""

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] to the latents the denoiser is trained on (a fresh VAE sample)."""
        return self.latents_from_distribution(self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist)

    def latents_from_distribution(self, latent_dist: Any) -> torch.Tensor:
        config = self.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        return (latent_dist.sample() - shift) * config.scaling_factor

    def noisy_input_and_target(self, latents: torch.Tensor) -> NoisyBatch:
        return self.objective.noisy_batch(latents)

    @abstractmethod
    def predict(self, denoiser: torch.nn.Module, noisy: NoisyBatch, conditioning: Conditioning,
                batch: dict[str, Any]) -> torch.Tensor:
        """Run the (possibly accelerate-wrapped) denoiser; the result is compared to noisy.target."""

    # --- adapter ---------------------------------------------------------------------------
    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        return get_peft_model_state_dict(self.denoiser)

    def save_adapter(self, directory: Path, lora_metadata: dict) -> None:
        """Write pytorch_lora_weights.safetensors in diffusers format, alpha included."""
        prefix = self.lora_save_prefix
        self.pipeline_class.save_lora_weights(
            str(directory),
            **{f"{prefix}_lora_layers": self.lora_state_dict(), f"{prefix}_lora_adapter_metadata": lora_metadata},
            safe_serialization=True,
        )

    # --- evaluation ------------------------------------------------------------------------
    def eval_pipeline(self) -> DiffusionPipeline:
        """The loaded pipeline, LoRA active, with a scheduler that samples what was trained."""
        return self.pipeline

    def eval_call_kwargs(self, guidance_scale: float) -> dict[str, Any]:
        return {"guidance_scale": guidance_scale}
