"""The model-family interface: everything that differs between architectures, and nothing else.

A family wraps a loaded diffusers pipeline. The loop asks it to encode prompts and images,
to make the noisy input and target, to run the denoiser, and to save the adapter. Facts
about a family are class attributes (pipeline class, denoiser attribute, LoRA targets…),
so most families override only what their architecture really does differently.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch
from diffusers import DiffusionPipeline
from diffusers.configuration_utils import FrozenDict
from peft.utils import get_peft_model_state_dict

from ..errors import InputError
from ..hub_ids import names_a_path
from ..objectives import NoisyBatch

Conditioning = dict[str, torch.Tensor]

# Parameters that belong to one kind of objective, and why they mean nothing to the other.
DDPM_ONLY = {
    "prediction_type": "flow models always learn the velocity noise - x0",
    "snr_gamma": "Min-SNR weighting is defined on DDPM noise schedules (see flow_loss_weighting)",
    "min_snr_gamma": "Min-SNR weighting is defined on DDPM noise schedules (see flow_loss_weighting)",
}
# Families whose only text encoders are language models (T5, Qwen, Mistral): train_text_encoder has
# no CLIP to put an adapter on, and their frozen encoders stay cached.
LANGUAGE_MODEL_TEXT = {
    "train_text_encoder": "its text encoder is a language model this trainer keeps frozen (only CLIP encoders train)",
}
FLOW_ONLY = {
    name: "DDPM models draw timesteps uniformly and weight them with snr_gamma"
    for name in ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "flow_loss_weighting")
}
# LoRA targets of the joint (MMDiT) blocks of SD3 and Flux: image and text streams.
JOINT_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                   "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
JOINT_MLP = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")


def read_model_index(source: str) -> dict:
    """model_index.json of a local pipeline folder or a hub repo (only this small file is fetched)."""
    path = Path(source).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise InputError(f"model_name: '{source}' is a folder but has no model_index.json; it must be "
                             "a diffusers pipeline folder (as written by save_pretrained).")
    elif path.exists():
        raise InputError(f"model_name: '{source}' is a file; give the pipeline folder that holds "
                         "model_index.json, or a hub id.")
    elif names_a_path(source) or "/" not in source:  # a model's hub id is always 'owner/name'
        raise InputError(f"model_name: there is no folder '{source}', and it is not a hub id "
                         "('owner/name').")
    else:
        from huggingface_hub import hf_hub_download

        try:
            index = Path(hf_hub_download(source, "model_index.json"))
        except Exception as exc:  # offline, gated, or no such repo: say which and stop
            raise InputError(f"model_name: could not fetch model_index.json of '{source}' from the "
                             f"hub ({type(exc).__name__}: {exc}).") from None
    try:
        return json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"model_name: {index} is not readable JSON ({exc}).") from None


def denoiser_class(index: dict, attr: str) -> type:
    import diffusers

    library, class_name = index[attr]
    model_class = getattr(diffusers, class_name, None)
    if library != "diffusers" or model_class is None:
        raise InputError(f"model_name: its {attr} is {library}.{class_name}, which this diffusers "
                         f"({diffusers.__version__}) does not have.")
    return model_class


class DenoiserNotLoaded(AttributeError):
    """Pipeline code reached for the denoiser's weights before staged loading read them."""


class NotLoaded:
    """The denoiser before its weights are read (staged loading): its config only, for the pipeline code
    and family facts that read nothing else (SD3 without T5 sizes its zero T5 features from it)."""

    def __init__(self, model_class: type, config: dict):
        self.model_class = model_class
        self.config = FrozenDict(config)

    def __getattr__(self, name: str) -> Any:
        raise DenoiserNotLoaded(f"the denoiser is not loaded yet (asked for its {name})")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise DenoiserNotLoaded("the denoiser is not loaded yet")


def linear_layer_names(module: torch.nn.Module) -> tuple[str, ...]:
    """Every linear layer of a model, by its full name (LoRA on all of them: 'all-linear')."""
    return tuple(name for name, child in module.named_modules() if isinstance(child, torch.nn.Linear))


class ModelFamily(ABC):
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    pipeline_class_name: ClassVar[str] = ""  # for families the installed diffusers may lack
    label: ClassVar[str]  # for people: "Stable Diffusion 1.x/2.x"
    denoiser_attr: ClassVar[str] = "unet"
    # The keyword the pipeline's save_lora_weights takes for the denoiser: unet_lora_layers…
    lora_save_prefix: ClassVar[str] = "unet"
    # LoRA targets per `lora_layers` preset ("all-linear" is found in the model), and the family's
    # own choice for lora_layers=default.
    lora_presets: ClassVar[dict[str, tuple[str, ...]]] = {
        "attention": ("to_k", "to_q", "to_v", "to_out.0"),
        "attention+mlp": ("to_k", "to_q", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
    }
    default_lora_layers: ClassVar[str] = "attention"
    resolution_multiple: ClassVar[int] = 8
    text_encoder_attrs: ClassVar[tuple[str, ...]] = ("text_encoder",)
    # The CLIP encoders train_text_encoder puts an adapter on (never T5), in save_lora_weights' order.
    trainable_text_attrs: ClassVar[tuple[str, ...]] = ("text_encoder",)
    # Whether the pipeline's LoRA loader wants PEFT's keys renamed to diffusers' (SD, SDXL).
    converts_lora_keys: ClassVar[bool] = False
    # Extra from_pretrained keywords (e.g. skip SD's safety checker).
    load_kwargs: ClassVar[dict[str, Any]] = {}
    # Parameters with no meaning for this family's objective, and why: said once at the start of a run.
    inapplicable_params: ClassVar[dict[str, str]] = {}
    # Parameters only this family reads, and why every other family ignores them (said to their runs).
    own_params: ClassVar[dict[str, str]] = {}
    # The single-file LoRA form ComfyUI, AUTOMATIC1111/Forge and civitai read for this family
    # (see export.py): "kohya" (lora_unet_* keys, alpha tensors) or "folded" (transformer.* keys,
    # alpha / rank folded into lora_B).
    single_file_form: ClassVar[str] = "kohya"
    # The single file's name prefix for each trainable text encoder, as ComfyUI's model_lora_keys_clip
    # maps them: kohya's lora_te_ for one CLIP (SD 1.x/2.x), lora_te1_/lora_te2_ beside another model.
    single_file_text_prefixes: ClassVar[dict[str, str]] = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    # --- memory plan (memory/plan.py): what a training step keeps for backward, per sample, in
    # units of the family's activation_unit bytes; fitted to bench/memory_simulation.py (fake-tensor
    # simulations of this trainer's step, bf16 compute). Without checkpointing: fixed + each block's
    # cost; with it: fixed_checkpointed + each block's saved input + the largest block, recomputed.
    activation_fixed: ClassVar[float] = 0.0
    activation_per_block: ClassVar[dict[str, float]] = {}  # denoiser config key counting blocks -> units
    activation_fixed_checkpointed: ClassVar[float] = 0.0
    activation_saved_per_block: ClassVar[float] = 0.0

    def __init__(self, pipeline: DiffusionPipeline, source: str):
        self.pipeline = pipeline
        self.source = source  # hub id or path it was loaded from
        self.vae_config = pipeline.vae.config  # latent scale and shift, still needed once the VAE is freed
        self.objective: Any = None  # set by configure_objective
        self.trained_text: tuple[str, ...] = ()  # text encoders with an adapter being trained

    # --- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, source: str, weight_dtype: torch.dtype, without_denoiser: bool = False) -> "ModelFamily":
        """Load the pipeline from a hub id or local folder: safetensors only, no remote code.
        `without_denoiser` (staged loading): everything but the denoiser, which stands in as its config
        alone until `load_denoiser` reads its weights, once the text encoders and VAE have done their work."""
        # Components saved empty (SD3 without T5, no safety checker) must be passed as None again.
        index = read_model_index(source)
        empty = {name: None for name, value in index.items()
                 if not name.startswith("_") and isinstance(value, list) and value[0] is None}
        if without_denoiser:
            empty[cls.denoiser_attr] = None
        try:
            pipeline = cls.pipeline_class.from_pretrained(
                source, torch_dtype=weight_dtype, use_safetensors=True, **{**empty, **cls.load_kwargs})
        except (OSError, ValueError) as exc:  # no safetensors, missing parts, unreachable hub
            raise InputError(f"model_name: could not load {cls.label} pipeline '{source}' with safetensors "
                             f"weights ({type(exc).__name__}: {exc}).") from None
        pipeline.set_progress_bar_config(disable=True)
        if without_denoiser:
            model_class = denoiser_class(index, cls.denoiser_attr)
            config = model_class.load_config(source, subfolder=cls.denoiser_attr)
            pipeline.__dict__[cls.denoiser_attr] = NotLoaded(model_class, config)
        family = cls(pipeline, source)
        family.keep_vae_stable(weight_dtype)
        return family

    def load_denoiser(self, **kwargs: Any) -> torch.nn.Module:
        """Read the denoiser's weights into the pipeline, with the from_pretrained keywords (torch_dtype,
        quantization_config) that load it straight into its storage (memory/storage.py)."""
        try:
            denoiser = self.denoiser_class.from_pretrained(self.source, subfolder=self.denoiser_attr,
                                                           use_safetensors=True, **kwargs)
        except (OSError, ValueError) as exc:
            raise InputError(f"model_name: could not load the {self.denoiser_attr} of '{self.source}' with "
                             f"safetensors weights ({type(exc).__name__}: {exc}).") from None
        return self.use_denoiser(denoiser)

    @property
    def denoiser_class(self) -> type:
        stand_in = self.pipeline.__dict__.get(self.denoiser_attr)
        return stand_in.model_class if isinstance(stand_in, NotLoaded) else type(stand_in)

    @property
    def denoiser_config(self) -> Any:
        return self.pipeline.__dict__[self.denoiser_attr].config

    def use_denoiser(self, denoiser: torch.nn.Module) -> torch.nn.Module:
        """Put a denoiser read elsewhere (memory/cast_loading.py) into the pipeline."""
        self.pipeline.register_modules(**{self.denoiser_attr: denoiser})
        return denoiser

    @property
    def denoiser_loaded(self) -> bool:
        return not isinstance(self.pipeline.__dict__.get(self.denoiser_attr), NotLoaded)

    @contextmanager
    def denoiser_config_only(self) -> Iterator[None]:
        """The loaded denoiser stands in as its config alone for a while (evaluate.RecordedPrompts runs
        eval calls up to the denoiser)."""
        current = self.pipeline.__dict__[self.denoiser_attr]
        self.pipeline.__dict__[self.denoiser_attr] = NotLoaded(type(current), current.config)
        try:
            yield
        finally:
            self.pipeline.__dict__[self.denoiser_attr] = current

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
    def frozen_text_attrs(self) -> tuple[str, ...]:
        return tuple(a for a in self.text_encoder_attrs if a not in self.trained_text)

    @property
    def frozen_modules(self) -> list[torch.nn.Module]:
        frozen = [getattr(self.pipeline, a, None) for a in self.frozen_text_attrs]
        return [m for m in (self.vae, *frozen) if m is not None]

    def inapplicable_notes(self, params: Any) -> list[str]:
        """One line per parameter set to a non-default value that this family cannot use."""
        from ..params import FIELDS
        from . import FAMILIES  # the registry imports this module

        others = {name: why for family in FAMILIES.values() for name, why in family.own_params.items()
                  if name not in self.own_params}
        return [f"{name}={getattr(params, name)} does not apply to {self.label}: {why}."
                for name, why in {**self.inapplicable_params, **others}.items()
                if getattr(params, name) != FIELDS[name].default]

    def park(self, attrs: tuple[str, ...], keep: bool) -> list[str]:
        """After caching: move these components to the CPU until eval images need them (keep), or
        free them. Returns what was done, for the log."""
        done = []
        for attr in attrs:
            module = getattr(self.pipeline, attr, None)
            if module is None:
                continue
            if keep:
                module.to("cpu")
            else:
                setattr(self.pipeline, attr, None)
            done.append(attr)
        return done

    def lora_targets(self, layers: str) -> tuple[str, ...]:
        """The denoiser modules a `lora_layers` choice puts LoRA on."""
        preset = self.default_lora_layers if layers == "default" else layers
        if preset == "all-linear":
            return linear_layer_names(self.denoiser)
        return self.lora_presets[preset]

    def model_prediction_type(self) -> str | None:
        """The prediction type the base model was trained with, if it has one."""
        return getattr(self.pipeline.scheduler.config, "prediction_type", None)

    @classmethod
    def prompt_tokens(cls, max_sequence_length: int) -> int:
        """Length of the text the denoiser attends to."""
        return 77

    @classmethod
    def activation_unit(cls, config: dict[str, Any], resolution: int, text_tokens: int) -> float:
        """Bytes of one bf16 activation map of the denoiser at this resolution, per sample."""
        latent = (resolution // 8) ** 2
        return latent * config["block_out_channels"][0] * 2

    @classmethod
    def latent_shape(cls, vae_config: dict[str, Any], resolution: int) -> tuple[int, int, int]:
        """Channels, height and width of what the denoiser is trained on (model_input), per sample."""
        return vae_config["latent_channels"], resolution // 8, resolution // 8

    @classmethod
    def conditioning_shapes(cls, config: dict[str, Any], text_tokens: int) -> dict[str, tuple[int, ...]] | None:
        """Each conditioning tensor's shape without the batch (names ending in "mask" are masks), for the
        memory simulation; None: the CLIP/T5 ones memory/simulate.py derives from the denoiser's config."""
        return None

    @classmethod
    def block_counts(cls, config: dict[str, Any]) -> dict[str, int]:
        return {key: len(n) if isinstance(n, (list, tuple)) else int(n)
                for key, n in ((key, config.get(key, 0)) for key in cls.activation_per_block)}

    @classmethod
    def activation_bytes(cls, config: dict[str, Any], resolution: int, text_tokens: int,
                         checkpointing: bool) -> float:
        """Activation bytes a training step holds at its peak, per sample, in bf16 compute."""
        unit = cls.activation_unit(config, resolution, text_tokens)
        counts = cls.block_counts(config)
        if not checkpointing:
            return unit * (cls.activation_fixed + sum(n * cls.activation_per_block[k] for k, n in counts.items()))
        return unit * (cls.activation_fixed_checkpointed + cls.largest_block_units(counts)
                       + sum(counts.values()) * cls.activation_saved_per_block)

    @classmethod
    def largest_block_units(cls, counts: dict[str, int]) -> float:
        return max((cls.activation_per_block[k] for k, n in counts.items() if n), default=0.0)

    # --- training --------------------------------------------------------------------------
    @abstractmethod
    def configure_objective(self, params: Any, prediction_type: str | None) -> None:
        """Choose and set up self.objective from the run's parameters."""

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Text conditioning for a batch of prompts; every tensor has the batch as dim 0. Gradients
        flow when a text encoder is trained (callers that only read it use torch.no_grad)."""
        return self.combine_text(self.encode_text(prompts, self.text_encoder_attrs))

    def encode_text(self, prompts: list[str], attrs: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """What the text encoders named in `attrs` make of the prompts, keyed by encoder ("<attr>"
        and "<attr>.pooled"), so a trained encoder's part can be recomputed while a frozen one's is
        cached. Families with trainable text encoders define it; the others override encode_prompts."""
        raise NotImplementedError(f"{type(self).__name__} trains no text encoder")

    def combine_text(self, parts: dict[str, torch.Tensor]) -> Conditioning:
        """The denoiser's conditioning from every encoder's part."""
        raise NotImplementedError(f"{type(self).__name__} trains no text encoder")

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] to the latents the denoiser is trained on (a fresh VAE sample)."""
        return self.latents_from_distribution(self.posterior(pixels))

    def posterior(self, pixels: torch.Tensor) -> Any:
        """The VAE's latent distribution of pixels in [-1, 1]; its parameters are 2C x h x w per image
        (what the latent cache stores)."""
        return self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist

    @property
    def latent_channels(self) -> int:
        return self.vae_config.latent_channels

    @property
    def vae_downscale(self) -> int:
        """How many pixels one latent spans, per side."""
        return 2 ** (len(self.vae_config.block_out_channels) - 1)

    def latents_from_distribution(self, latent_dist: Any) -> torch.Tensor:
        config = self.vae_config
        latents = latent_dist.sample()
        if getattr(config, "shift_factor", None):  # SD3 and Flux VAEs
            latents = latents - config.shift_factor
        return latents * config.scaling_factor

    def noisy_input_and_target(self, latents: torch.Tensor) -> NoisyBatch:
        return self.objective.noisy_batch(latents)

    @abstractmethod
    def predict(self, denoiser: torch.nn.Module, noisy: NoisyBatch, conditioning: Conditioning,
                batch: dict[str, Any]) -> torch.Tensor:
        """Run the (possibly accelerate-wrapped) denoiser; the result is compared to noisy.target."""

    # --- adapter ---------------------------------------------------------------------------
    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        return get_peft_model_state_dict(self.denoiser)

    def save_adapter(self, directory: Path, layers: dict[str, tuple[dict[str, torch.Tensor], dict]]) -> None:
        """Write pytorch_lora_weights.safetensors in diffusers format, alpha included. `layers`: per
        component ("denoiser", "text_encoder", "text_encoder_2") its PEFT state dict and config."""
        from diffusers.utils import convert_state_dict_to_diffusers

        keywords = {}
        for component, (state, metadata) in layers.items():
            prefix = self.lora_save_prefix if component == "denoiser" else component
            plain = any(".lora_A." in key for key in state)  # LoKr/LoHa keys have no diffusers names
            state = convert_state_dict_to_diffusers(state) if self.converts_lora_keys and plain else state
            if component != "denoiser":  # diffusers hands text encoders to transformers, which wants DoRA's ".weight"
                state = {k + ".weight" if k.endswith(".lora_magnitude_vector") else k: v for k, v in state.items()}
            keywords[f"{prefix}_lora_layers"] = state
            keywords[f"{prefix}_lora_adapter_metadata"] = metadata
        self.pipeline_class.save_lora_weights(str(directory), **keywords, safe_serialization=True)

    @classmethod
    @abstractmethod
    def base_model_metadata(cls, denoiser_config: dict[str, Any], prediction_type: str | None) -> dict[str, str]:
        """What kohya's trainers write for this base model: ss_base_model_version, ss_v2 and the
        ModelSpec architecture / implementation / prediction type, from the denoiser's config."""

    # --- evaluation ------------------------------------------------------------------------
    def eval_pipeline(self) -> DiffusionPipeline:
        """The loaded pipeline, LoRA active, with a scheduler that samples what was trained."""
        return self.pipeline

    def eval_call_kwargs(self, guidance_scale: float) -> dict[str, Any]:
        """Keywords for the pipeline call; guidance 0 leaves the pipeline's own default."""
        return {"guidance_scale": guidance_scale} if guidance_scale else {}


class FlowMatchingFamily(ModelFamily):
    """Families trained with rectified flow (SD3, Flux): a transformer denoiser, no prediction type."""

    denoiser_attr = "transformer"
    lora_save_prefix = "transformer"
    single_file_form = "folded"  # ComfyUI reads transformer.* lora_A/lora_B keys, but no alpha
    resolution_multiple = 16  # 8x VAE, then 2x2 patches
    inapplicable_params = DDPM_ONLY

    @classmethod
    def activation_unit(cls, config: dict[str, Any], resolution: int, text_tokens: int) -> float:
        tokens = (resolution // cls.resolution_multiple) ** 2 + text_tokens
        return tokens * config["num_attention_heads"] * config["attention_head_dim"] * 2

    def model_prediction_type(self) -> str | None:
        return None

    def configure_objective(self, params: Any, prediction_type: str | None) -> None:
        from ..objectives import FlowMatchObjective

        self.objective = FlowMatchObjective(
            self.pipeline.scheduler.config, params.weighting_scheme, params.logit_mean, params.logit_std,
            params.mode_scale, params.flow_loss_weighting, params.noise_offset)
