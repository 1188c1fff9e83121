"""The frozen base in less memory, the LoRA unchanged: `base_precision` and `offload: blocks`.

The API the run's setup and the memory plan share (all explicit values, no params object):

    check_storage(base_precision)                             refuse a storage whose library is missing
    resolve_storage(base_precision, fallback, compute_dtype)  -> BaseStorage (`auto`: fallback)
    storage.load_kwargs(cuda)                                 torch_dtype / quantization_config for the
                                                              denoiser's from_pretrained
    apply_base_storage(denoiser, storage, cuda)               what from_pretrained cannot do: fp8
                                                              layerwise casting, nf4 on a CPU
    enable_casting(denoiser, storage)                         the fp8 casting alone (on a meta model too)
    stored_bytes(module)                                      what a loaded module's weights really take

Call order: load with `load_kwargs`, then `apply_base_storage`, then attach the LoRA (so the LoRA
weights stay fp32 and are never cast or quantized), then offload.stream_blocks if asked.

Libraries (each installs beside torch 2.14.1 without replacing it, and trains a PEFT LoRA on a CPU):
- fp8: diffusers' own `enable_layerwise_casting` (weights stored in float8_e4m3fn, each layer upcast to
  the compute dtype as it runs; norms and embeddings stay as loaded). Conv2d layers are skipped on
  UNets: cast convolutions break gradient checkpointing (saved bf16, recomputed fp8). A run reads
  such a model tensor by tensor, each cast as it is read (cast_loading.py), not through
  from_pretrained and then apply_base_storage.
- int8: torchao's int8 weight-only quantization through diffusers' `TorchAoConfig`, applied while
  loading (no full-precision copy of the model). torchao is maintained by the PyTorch team, is what
  diffusers documents first, and PEFT has a LoRA layer for its tensors; optimum-quanto would also
  work but diffusers deprecates it.
- nf4: bitsandbytes 4-bit NF4 (QLoRA's format). On CUDA through diffusers' `BitsAndBytesConfig` while
  loading; diffusers refuses bitsandbytes 4-bit without a GPU, so on a CPU the Linear layers are
  replaced by bitsandbytes' `Linear4bit` after loading (the model is briefly in host RAM at its load
  dtype). The same package gives `optimizer=adamw8bit` its 8-bit AdamW.
- fp32/bf16/fp16: plain storage. When the storage dtype is below the run's compute dtype
  (base_precision=bf16 with mixed_precision=no), layers are upcast as they run (layerwise casting).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError

PLAIN = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = {dtype: name for name, dtype in PLAIN.items()}
QUANTIZED = ("int8", "nf4")
LIBRARIES = {"int8": "int8 (torchao)", "nf4": "nf4 (bitsandbytes)"}


@dataclass(frozen=True)
class BaseStorage:
    """How the denoiser's frozen weights are held: `precision` (fp32, bf16, fp16, fp8, int8, nf4),
    the dtype it loads in, and the dtype its layers compute in."""

    precision: str
    load_dtype: torch.dtype
    compute_dtype: torch.dtype

    @property
    def quantized(self) -> bool:
        return self.precision in QUANTIZED

    @property
    def casts_layers(self) -> bool:
        """Stored in one dtype, cast layer by layer to compute in another (fp32 storage needs no
        cast: autocast computes from it)."""
        return self.precision == "fp8" or PLAIN.get(self.precision, self.compute_dtype) not in (self.compute_dtype,
                                                                                               torch.float32)

    @property
    def cast_storage_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self.precision == "fp8" else PLAIN[self.precision]

    def describe(self) -> str:
        name = {"fp8": "fp8 (float8_e4m3fn)", "int8": "int8 (torchao, weight-only)",
                "nf4": "nf4 (bitsandbytes 4-bit)"}.get(self.precision, self.precision)
        compute = NAMES[self.compute_dtype]
        return name if self.precision == compute else f"{name}, computing in {compute}"

    def load_kwargs(self, cuda: bool) -> dict[str, Any]:
        """Keywords for the denoiser's `from_pretrained`: its dtype and, for int8 (and nf4 on CUDA),
        the quantization config, so it loads straight into its stored form."""
        kwargs: dict[str, Any] = {"torch_dtype": self.load_dtype}
        config = quantization_config_for(self.precision, self.compute_dtype, cuda)
        if config is not None:
            kwargs["quantization_config"] = config
        return kwargs


def fp8_available() -> bool:
    return hasattr(torch, "float8_e4m3fn")


def check_storage(base_precision: str, what: str = "") -> None:
    """Refuse, before anything loads, a storage whose library is missing; say what works instead.
    `what`: the storage's user when not base_precision (the plan's int8 text encoders)."""
    import importlib.util

    if base_precision == "fp8" and not fp8_available():
        raise InputError(f"base_precision: fp8 needs torch's float8 types (torch >= 2.1; this is "
                         f"{torch.__version__}); choose int8, bf16 or auto.")
    needs = {"int8": "torchao", "nf4": "bitsandbytes"}
    if base_precision in needs and importlib.util.find_spec(needs[base_precision]) is None:
        package = needs[base_precision]
        if what:
            raise InputError(f"gpu_memory_gb: {what} needs the {package} package, which is not installed "
                             f"(pip install {package}); or plan for a larger GPU.")
        raise InputError(f"base_precision: {base_precision} needs the {package} package, which is not "
                         f"installed (pip install {package}); or choose fp8, bf16 or auto.")


def resolve_storage(base_precision: str, fallback: torch.dtype, compute_dtype: torch.dtype) -> BaseStorage:
    """`auto` where the memory plan chose nothing (no GPU budget): the dtype the rest of the pipeline
    loads in (`fallback`, from mixed_precision), as before base_precision existed."""
    if base_precision == "auto":
        return BaseStorage(NAMES[fallback], fallback, compute_dtype)
    if base_precision in PLAIN:
        storage = BaseStorage(base_precision, PLAIN[base_precision], compute_dtype)
        # cast layers load in the compute dtype: the layers casting skips (norms, embeddings) compute as loaded
        return BaseStorage(base_precision, compute_dtype, compute_dtype) if storage.casts_layers else storage
    if base_precision == "int8":  # diffusers loads torchao integer weights in bf16 only
        return BaseStorage(base_precision, torch.bfloat16, compute_dtype)
    return BaseStorage(base_precision, compute_dtype, compute_dtype)  # non-quantized parts in the compute dtype


def quantization_config_for(precision: str, compute_dtype: torch.dtype, cuda: bool) -> Any | None:
    """The diffusers quantization config that loads a model straight into `precision`, or None where
    loading cannot quantize (plain dtypes, fp8 casting, nf4 on a CPU: see apply_base_storage)."""
    if precision == "int8":
        from diffusers import TorchAoConfig
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    if precision == "nf4" and cuda:
        from diffusers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    return None


def apply_base_storage(denoiser: torch.nn.Module, storage: BaseStorage, cuda: bool) -> None:
    """The part of the storage that loading cannot do, in place, before the LoRA is attached."""
    if storage.casts_layers:
        enable_casting(denoiser, storage)
    elif storage.precision == "int8" and storage.compute_dtype != storage.load_dtype:
        for tensor in [*denoiser.parameters(), *denoiser.buffers()]:  # the layers torchao left unquantized
            if type(tensor) in (torch.Tensor, torch.nn.Parameter) and tensor.is_floating_point():
                tensor.data = tensor.data.to(storage.compute_dtype)
    elif storage.precision == "nf4" and not cuda:
        quantize_linears_nf4(denoiser, storage.compute_dtype)


def enable_casting(denoiser: torch.nn.Module, storage: BaseStorage) -> None:
    """diffusers' layerwise casting with our skip rule (a UNet's convolutions stay as loaded); on a
    meta-device model too, before its weights are read (cast_loading.py)."""
    unet = "UNet" in type(denoiser).__name__
    denoiser.enable_layerwise_casting(storage_dtype=storage.cast_storage_dtype, compute_dtype=storage.compute_dtype,
                                      skip_modules_classes=(torch.nn.Conv2d,) if unet else None)


def quantize_linears_nf4(model: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Replace every nn.Linear by a bitsandbytes NF4 Linear4bit holding the same weights; returns how many."""
    import bitsandbytes as bnb

    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", device="meta")
            layer.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, layer.to(child.weight.device))
            count += 1
    return count


def quantize_int8(module: torch.nn.Module) -> None:
    """torchao int8 weight-only, in place, on a loaded model (the memory plan's int8 text encoders)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(module, Int8WeightOnlyConfig())


def stored_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers as stored (quantized tensors counted by their data)."""
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        total += quantized_bytes(tensor)
    return total


def quantized_bytes(tensor: torch.Tensor) -> int:
    if hasattr(type(tensor), "__tensor_flatten__") and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = tensor.__tensor_flatten__()  # a tensor subclass (torchao): count the tensors it holds
        return sum(quantized_bytes(getattr(tensor, n)) for n in names)
    absmax = getattr(getattr(tensor, "quant_state", None), "absmax", None)  # bitsandbytes Params4bit
    own = tensor.numel() * tensor.element_size()
    return own + (absmax.numel() * absmax.element_size() if absmax is not None else 0)
