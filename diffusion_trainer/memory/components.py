"""A pipeline's components from their config files alone: which there are, and what their weights
weigh in each storage form, counted on meta-device models (no weight is read or allocated)."""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..families.base import read_model_index
from .offload import RESIDENT


def component_config(source: str, component: str) -> dict:
    """<component>/config.json of a local pipeline folder or a hub repo (only that file is fetched)."""
    path = Path(source).expanduser()
    if path.is_dir():
        file = path / component / "config.json"
        if not file.is_file():
            raise InputError(f"model_name: '{source}' has no {component}/config.json.")
    else:
        from huggingface_hub import hf_hub_download

        try:
            file = Path(hf_hub_download(source, f"{component}/config.json"))
        except Exception as exc:  # offline, gated, or no such file: say which and stop
            raise InputError(f"model_name: could not fetch {component}/config.json of '{source}' "
                             f"({type(exc).__name__}: {exc}).") from None
    return json.loads(file.read_text())


def meta_model(library: str, class_name: str, config: dict) -> torch.nn.Module:
    """The component built on the meta device: shapes and dtypes, no memory."""
    from accelerate import init_empty_weights

    module = __import__(library, fromlist=[class_name])
    cls = getattr(module, class_name)
    with init_empty_weights():
        if library != "transformers":
            return cls.from_config(config)
        model = cls._from_config(getattr(module, "AutoConfig").for_model(**config))
    model.tie_weights()  # as from_pretrained does (outside init_empty_weights, which would copy): counted once
    return model


# What diffusers' layerwise casting leaves in the compute dtype: its DEFAULT_SKIP_MODULES_PATTERN
# (with the models' own "pos_embed", "norm"), searched in each module's full dotted name.
CAST_SKIPPED = re.compile(r"pos_embed|patch_embed|norm|^proj_in$|^proj_out$")


@dataclass(frozen=True)
class Weights:
    """A component's parameter counts (floating-point buffers counted with `other`): in linear layers
    (what 8/4-bit storage shrinks), in the layers fp8 casting stores in 8 bits (not a UNet's
    convolutions: the run skips them, as cast convolutions break gradient checkpointing), in the
    repeated blocks (what offloading streams; the last two are on the device when backward begins,
    where a checkpointed step peaks: memory/offload.py keeps two), and the linear (and fp8-cast) weights whose bf16 copy
    backward keeps under gradient checkpointing: those outside every checkpointed unit, plus the
    largest unit's, recomputed one unit at a time."""

    linear: int
    other: int
    linear_rows: int
    castable: int
    blocks_total: int
    largest_block: int
    last_blocks: int
    checkpointed_linear: int
    checkpointed_castable: int
    linears: tuple[tuple[str, int, int], ...]  # (name, in, out)

    @property
    def total(self) -> int:
        return self.linear + self.other

    @classmethod
    def of(cls, module: torch.nn.Module) -> "Weights":
        linears = [(name, m) for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
        linear = sum(m.weight.numel() for _, m in linears)
        unet = "UNet" in type(module).__name__
        cast = (torch.nn.Linear,) if unet else (torch.nn.Linear, torch.nn.Conv2d)
        cast_layers = {name for name, m in module.named_modules()
                       if isinstance(m, cast) and not CAST_SKIPPED.search(name)}
        castable = sum(sum(p.numel() for p in m.parameters())
                       for name, m in module.named_modules() if name in cast_layers)
        blocks = [b for child in module.children() if isinstance(child, torch.nn.ModuleList) for b in child]
        sizes = [sum(p.numel() for p in b.parameters()) for b in blocks] or [0]
        buffers = sum(b.numel() for b in module.buffers() if b.is_floating_point())  # SD3's position table
        units = checkpointed_units(module, unet)

        def copies(counted) -> int:  # weights of the counted linear layers kept with checkpointing
            per_unit = [sum(m.weight.numel() for name, m in linears if counted(name) and in_unit(name, unit))
                        for unit in units] or [0]
            outside = sum(m.weight.numel() for name, m in linears
                          if counted(name) and not any(in_unit(name, unit) for unit in units))
            return outside + max(per_unit)

        return cls(linear, sum(p.numel() for p in module.parameters()) - linear + buffers,
                   sum(m.out_features for _, m in linears), castable, sum(sizes), max(sizes), sum(sizes[-RESIDENT:]),
                   copies(lambda name: True), copies(lambda name: name in cast_layers),
                   tuple((name, m.in_features, m.out_features) for name, m in linears))


def checkpointed_units(module: torch.nn.Module, unet: bool) -> list[str]:
    """Names of the modules diffusers' gradient checkpointing recomputes one at a time: a
    transformer's blocks; a UNet's resnets and its attentions' transformer blocks."""
    if not unet:
        return [f"{name}.{i}" for name, child in module.named_children()
                if isinstance(child, torch.nn.ModuleList) for i in range(len(child))]
    return [f"{name}.{i}" for name, child in module.named_modules() if isinstance(child, torch.nn.ModuleList)
            and name.rsplit(".", 1)[-1] in ("resnets", "transformer_blocks") for i in range(len(child))]


def in_unit(name: str, unit: str) -> bool:
    return name.startswith(unit + ".")


@dataclass
class Component:
    name: str  # the pipeline attribute: unet, transformer, vae, text_encoder_2…
    library: str
    class_name: str
    config: dict
    weights: Weights


@functools.lru_cache(maxsize=16)
def pipeline_components(source: str, wanted: tuple[str, ...]) -> dict[str, Component]:
    """The components named in `wanted` that the pipeline has (a component saved empty is left out)."""
    index = read_model_index(source)
    found = {}
    for name in wanted:
        entry = index.get(name)
        if not isinstance(entry, list) or entry[0] is None:
            continue
        library, class_name = entry
        config = {k: v for k, v in component_config(source, name).items()
                  if library == "transformers" or not k.startswith("_")}
        config.pop("architectures", None) if library == "transformers" else None
        model = meta_model(library, class_name, config)
        found[name] = Component(name, library, class_name, config, Weights.of(model))
    return found
