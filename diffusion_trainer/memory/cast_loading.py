"""Reading a denoiser whose layers are stored below the dtype its files hold (base_precision=fp8, or
bf16 storage computing in fp32) one tensor at a time, each cast to its storage dtype as it is read.

diffusers' from_pretrained reads the whole model in one dtype and enable_layerwise_casting casts it
afterwards, so where that dtype is not the files' (mixed_precision=no, or files saved in fp32) host
RAM first holds a converted copy of all of it (bench/host_ram.py: +2.86 GB on a 1.31 B-parameter
transformer, growing with the model; +0.20 GB here). Here the model is built on the meta device
from its config, given the same layerwise casting as storage.apply_base_storage (diffusers' hooks,
the same skip rules), and each tensor of its safetensors files is read, cast to the dtype its layer
stores and put in place: host RAM holds the stored model and one tensor.

`read_cast` returns None when it cannot promise the same model as from_pretrained (old attention
names, which from_pretrained converts; modules kept in fp32; no safetensors found); the run then
loads through from_pretrained and says what that costs. Files lacking some of the model's weights
are refused, naming them, before any is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError

SINGLE = "diffusion_pytorch_model.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"


def weight_files(source: str, subfolder: str) -> list[Path] | None:
    """The denoiser's safetensors files (every shard of a sharded one), from a local pipeline folder or
    the hub (fetched as from_pretrained would fetch them); None where there are none."""
    folder = Path(source).expanduser() / subfolder
    if folder.is_dir():
        if (folder / INDEX).is_file():
            return [folder / name for name in shard_names(folder / INDEX)]
        return [folder / SINGLE] if (folder / SINGLE).is_file() else None
    from huggingface_hub import hf_hub_download

    try:
        index = Path(hf_hub_download(source, INDEX, subfolder=subfolder))
    except Exception:  # not sharded (or unreachable: the single file's fetch says which)
        try:
            return [Path(hf_hub_download(source, SINGLE, subfolder=subfolder))]
        except Exception:
            return None
    return [Path(hf_hub_download(source, name, subfolder=subfolder)) for name in shard_names(index)]


def shard_names(index: Path) -> list[str]:
    return sorted(set(json.loads(index.read_text())["weight_map"].values()))


def read_cast(model_class: type, config: Any, source: str, subfolder: str, load_dtype: torch.dtype,
              enable_casting: Any) -> torch.nn.Module | None:
    """The denoiser with `enable_casting` (a function of the model) applied before any weight is read,
    every other tensor in `load_dtype`; None where from_pretrained must do it (see the module's note)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open

    if model_class._keep_in_fp32_modules:
        return None
    files = weight_files(source, subfolder)
    if not files:
        return None
    with init_empty_weights():  # parameters on the meta device; buffers computed at init stay real
        model = model_class.from_config(config)
    in_dtype(saved_tensors(model), load_dtype)
    enable_casting(model)
    expected = model.state_dict()
    names: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as opened:
            names.update(opened.keys())
    missing = sorted(set(expected) - names)
    if missing and any(getattr(m, "_from_deprecated_attn_block", False) for m in model.modules()):
        return None  # an old checkpoint's attention names, which from_pretrained converts
    if missing:
        raise InputError(f"model_name: the {subfolder} files at '{files[0].parent}' lack {len(missing)} of the "
                         f"{model_class.__name__}'s weights (e.g. {', '.join(missing[:3])}): not a complete "
                         "diffusers checkpoint of it.")
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as opened:
            for name in opened.keys():
                if name not in expected:
                    continue  # as from_pretrained, names the model does not have are ignored
                tensor = opened.get_tensor(name)
                if tensor.is_floating_point():  # through load_dtype, as from_pretrained then casting rounds
                    tensor = tensor.to(load_dtype).to(expected[name].dtype)
                set_module_tensor_to_device(model, name, "cpu", value=tensor, dtype=tensor.dtype)
    model.register_to_config(_name_or_path=source)
    return model.eval()


def saved_tensors(model: torch.nn.Module) -> list[tuple[dict, str]]:
    """(store, key) of each parameter and buffer the model saves: not the buffers it computes at init,
    which from_pretrained leaves in their own dtype."""
    saved = set(model.state_dict())
    found = []
    for prefix, module in model.named_modules():
        for store in (module._parameters, module._buffers):
            found += [(store, key) for key, tensor in store.items()
                      if tensor is not None and (f"{prefix}.{key}" if prefix else key) in saved]
    return found


def in_dtype(tensors: list[tuple[dict, str]], dtype: torch.dtype) -> None:
    for store, key in tensors:
        tensor = store[key]
        if tensor.is_floating_point():
            cast = tensor.detach().to(dtype)
            store[key] = torch.nn.Parameter(cast, tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) else cast
