"""The adapters: attach them (LoRA, DoRA, LoKr or LoHa, through peft) to the denoiser and, when
asked, the CLIP text encoders; their state for saving (PiSSA/OLoRA converted back to the base);
and their EMA."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from diffusers.training_utils import EMAModel, cast_training_params
from peft import LoHaConfig, LoKrConfig, LoraConfig
from peft.utils import get_peft_model_state_dict

# The CLIP layers a text-encoder adapter goes on (the names diffusers' scripts and ComfyUI map).
TEXT_ENCODER_LAYERS = {
    "attention": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "attention+mlp": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}
# Which loaders read each adapter type from the files this trainer writes (README: "Adapter types").
DIFFUSERS_LOADS = frozenset({"lora", "dora"})  # load_lora_weights builds LoRA configs only
SINGLE_FILE_TYPES = frozenset({"lora", "dora", "lokr", "loha"})  # ComfyUI reads each (DoRA: dora_scale)
# FLUX.2's single file names BFL's modules, where q, k and v are one fused layer: a LoRA (or DoRA) on each
# becomes one LoRA on the fused layer, but a Kronecker or Hadamard product on each has no such form.
FUSED_QKV_FORMS = frozenset({"bfl"})
NO_FUSED_FORM = frozenset({"lokr", "loha"})


def single_file_written(kind: str, single_file_form: str) -> bool:
    """Whether the single file (ComfyUI, A1111) is written for adapter type `kind` of a family whose
    single file has `single_file_form`."""
    return kind in SINGLE_FILE_TYPES and not (single_file_form in FUSED_QKV_FORMS and kind in NO_FUSED_FORM)
BASE_CHANGING_INITS = frozenset({"pissa", "olora"})


def loaders(kind: str, single_file_form: str = "kohya") -> dict[str, str]:
    """Which loader reads which file of an adapter type, for the log, the model card and the info file."""
    if not single_file_written(kind, single_file_form):
        unwritten = (f"no single file is written: {kind} cannot be expressed on FLUX.2's fused q/k/v layers, "
                     "which ComfyUI's FLUX.2 model uses; load the folder with peft")
        return {"diffusers load_lora_weights (the folder)": "no (it builds LoRA configs only): load the folder "
                "with peft, as the README shows", "ComfyUI (the single file)": f"no: {unwritten}",
                "AUTOMATIC1111 (the single file)": f"no: {unwritten}"}
    lycoris = "reads the same keys through its LyCORIS support (not tested here)"
    comfy = "yes, in versions whose weight_decompose takes a dora_scale on the output axis" if kind == "dora" else "yes"
    return {
        "diffusers load_lora_weights (the folder)": "yes" if kind in DIFFUSERS_LOADS else
        "no (it builds LoRA configs only): load the folder with peft, as the README shows",
        "diffusers load_lora_weights (the single file)": {
            "lora": "yes",
            "dora": "no: it takes dora_scale for peft's magnitude, which this one is not; load the folder",
            "lokr": "no: load the folder with peft", "loha": "no: load the folder with peft"}[kind],
        "ComfyUI (the single file)": comfy if kind in SINGLE_FILE_TYPES else "no",
        "AUTOMATIC1111 (the single file)": {
            "lora": "yes", "lokr": lycoris, "loha": lycoris,
            "dora": "no: its Lora extension normalises dora_scale per input column where peft's DoRA (and this "
                    "file) normalises per output row, so the weights come out wrong; use ComfyUI or the folder"}[kind],
    }


@dataclass(frozen=True)
class AdapterSpec:
    kind: str  # lora_type: lora, dora, lokr, loha
    rank: int
    alpha: int
    dropout: float = 0.0
    init: str = "gaussian"  # lora_init

    def peft_config(self, targets: tuple[str, ...]):
        targets = list(targets)
        if self.kind in ("lokr", "loha"):
            config = LoKrConfig if self.kind == "lokr" else LoHaConfig
            return config(r=self.rank, alpha=self.alpha, rank_dropout=self.dropout, target_modules=targets)
        init = True if self.init == "default" else self.init
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, init_lora_weights=init,
                          use_dora=self.kind == "dora", target_modules=targets)


def attach(module: torch.nn.Module, spec: AdapterSpec, targets: tuple[str, ...]) -> list[torch.nn.Parameter]:
    """Freeze the module, add the adapter (starting as the base model, except that PiSSA/OLoRA move
    part of the base into it), keep its trainable weights in fp32 whatever the base dtype, return them."""
    from diffusers import ModelMixin
    from peft import inject_adapter_in_model

    module.requires_grad_(False)
    config = spec.peft_config(targets)
    if isinstance(module, ModelMixin):
        module.add_adapter(config)
    else:  # a transformers text encoder: its own add_adapter wants a newer peft than diffusers does
        inject_adapter_in_model(config, module)
        module.peft_config = {"default": config}
    cast_training_params(module, dtype=torch.float32)
    trainable = [p for p in module.parameters() if p.requires_grad]
    if not trainable:
        raise RuntimeError(f"no adapter target modules {targets} found in {type(module).__name__}")
    return trainable


def attach_lora(denoiser: torch.nn.Module, rank: int, alpha: int,
                target_modules: tuple[str, ...]) -> list[torch.nn.Parameter]:
    """A plain LoRA (Gaussian A, B = 0) on the denoiser."""
    return attach(denoiser, AdapterSpec("lora", rank, alpha), target_modules)


def lora_metadata(module: torch.nn.Module) -> dict:
    """The adapter's PEFT config; saved in the safetensors header so loaders keep alpha."""
    return module.peft_config["default"].to_dict()


class Adapter:
    """One module's adapter: its trainable weights, and for PiSSA/OLoRA the starting A and B,
    so the saved adapter is (B A - B0 A0) as a rank-2r LoRA that applies to the original base."""

    def __init__(self, module: torch.nn.Module, spec: AdapterSpec, targets: tuple[str, ...]):
        self.module = module
        self.spec = spec
        self.trainable = attach(module, spec, targets)
        self.initial = ({k: v.detach().clone() for k, v in get_peft_model_state_dict(module).items()}
                        if spec.init in BASE_CHANGING_INITS else None)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = get_peft_model_state_dict(self.module)
        if self.initial is None:
            return state
        out = {}
        for key, value in state.items():
            start = self.initial[key]
            if ".lora_A." in key:
                out[key] = torch.cat([value, start], dim=0)
            elif ".lora_B." in key:
                out[key] = torch.cat([value, -start], dim=1)
            else:
                out[key] = value
        return out

    def metadata(self) -> dict:
        # dropout is for training: a loader that injects fresh layers leaves them in train mode, so
        # a saved dropout would drop at inference (diffusers' load_lora_weights does)
        config = {**lora_metadata(self.module), "lora_dropout": 0.0}
        if self.spec.kind in ("lokr", "loha"):
            config = {**config, "rank_dropout": 0.0, "module_dropout": 0.0}
            del config["lora_dropout"]
        if self.initial is not None:  # the converted adapter: twice the rank at the same scale
            config = {**config, "r": 2 * config["r"], "lora_alpha": 2 * config["lora_alpha"], "init_lora_weights": True}
        return config


class LoraEMA:
    """An exponential moving average of the adapter weights (diffusers' EMAModel)."""

    def __init__(self, parameters: list[torch.nn.Parameter], decay: float):
        self.parameters = parameters
        self.ema = EMAModel(parameters, decay=decay)

    def step(self) -> None:
        self.ema.step(self.parameters)

    # registered with accelerate, so checkpoints hold the average too
    def state_dict(self) -> dict:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state)
        self.ema.shadow_params = [s.to(p.device) for s, p in zip(self.ema.shadow_params, self.parameters)]

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model for the duration (eval images, saving)."""
        self.ema.store(self.parameters)
        self.ema.copy_to(self.parameters)
        try:
            yield
        finally:
            self.ema.restore(self.parameters)
