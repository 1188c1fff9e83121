"""The frozen base's storage forms and block offload, as the fake-tensor simulation applies them
(memory/simulate.py), with the libraries and, where it can, the code a run uses (memory/storage.py):

- fp8: diffusers' `enable_layerwise_casting(storage_dtype=float8_e4m3fn, compute_dtype=bfloat16)`,
  Conv2d skipped on UNets; runs unchanged under fake tensors.
- int8: torchao's `quantize_(model, Int8WeightOnlyConfig())` on every nn.Linear, which is what
  diffusers' `TorchAoConfig` does layer by layer while loading; runs unchanged under fake tensors.
- nf4: bitsandbytes. Its `Params4bit` cannot wrap a fake tensor (`Tensor._make_subclass` refuses
  it), so `Nf4Linear` emulates `Linear4bit` around bitsandbytes' own functions: the weight packed
  by `bitsandbytes.functional.quantize_4bit` (two 4-bit codes per byte, an fp32 absmax per 64
  weights, as diffusers' `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")` stores
  it without double quantization) and the forward through `bitsandbytes.matmul_4bit`, the autograd
  function that keeps only the packed weight for backward and dequantizes it there.
- offload: by accounting (copies to an accelerator cannot run on a CPU): the blocks' frozen
  weights are not counted, except while a block is on the device. `swap` follows this trainer's
  block swap (memory/offload.py): a block's pre-forward hook brings it over, and the oldest of the
  blocks on the device leaves when a third arrives; the LoRA and its optimizer states stay.
  `diffusers` follows diffusers' `enable_group_offload(offload_type="block_level",
  num_blocks_per_group=1, use_stream=True)`: a block's pre-forward hook loads it if it is in host
  memory and prefetches the next block, its post-forward hook sends it back (autograd keeps a
  block's weights until that block's backward is done). Under gradient checkpointing each block's
  forward runs again in backward with its hooks, but PyTorch's non-reentrant checkpoint stops that
  recomputation early, before the post-forward hook: each block loaded in backward stays, and by
  the end of backward the device holds nearly every block (why offload.py does not use it).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

LIBRARIES = {"int8": "torchao", "nf4": "bitsandbytes"}
NF4_BLOCK = 64


def missing_library(precision: str) -> str | None:
    """The package a storage needs that is not installed, or None."""
    package = LIBRARIES.get(precision)
    return package if package and importlib.util.find_spec(package) is None else None


def apply_storage(denoiser: torch.nn.Module, precision: str) -> None:
    """Store the frozen base as a run would, before the LoRA is attached (bf16 base expected): fp8 and
    int8 through the run's own code (memory/storage.py), nf4 emulated (Nf4Linear)."""
    from . import storage

    if precision == "fp8":
        bf16 = torch.bfloat16
        storage.apply_base_storage(denoiser, storage.resolve_storage("fp8", bf16, bf16), cuda=True)
    elif precision == "int8":  # what TorchAoConfig applies to each linear layer while a run loads
        storage.quantize_int8(denoiser)
    elif precision == "nf4":
        for parent in list(denoiser.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    setattr(parent, name, Nf4Linear(child))
    elif precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"unknown storage {precision!r}")


class Nf4Linear(torch.nn.Linear):
    """bitsandbytes' Linear4bit (nf4, bf16 compute) built from bitsandbytes' functions on a plain
    tensor; an nn.Linear so that PEFT wraps it as it wraps any linear layer."""

    def __init__(self, linear: torch.nn.Linear):
        import bitsandbytes.functional as bnbf

        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed, state = bnbf.quantize_4bit(linear.weight.data, blocksize=NF4_BLOCK, quant_type="nf4",
                                           compress_statistics=False)
        self.weight = torch.nn.Parameter(packed, requires_grad=False)
        self.register_buffer("absmax", state.absmax)  # so that offloading moves it with the weight
        self.quant_state = state
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        dtype = x.dtype
        self.quant_state.absmax = self.absmax
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        return bnb.matmul_4bit(x.to(torch.bfloat16), self.weight.t(), bias=bias,
                               quant_state=self.quant_state).to(dtype)


def inner_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding a (possibly subclassed, e.g. torchao) tensor's data."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is None or type(tensor) in (torch.Tensor, torch.nn.Parameter):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    inner = [getattr(tensor, name) for name in names]
    return [plain for t in inner if isinstance(t, torch.Tensor) for plain in inner_tensors(t)]


def blocks(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks group offload streams: the members of the denoiser's top-level module lists."""
    return [b for child in denoiser.children() if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential))
            for b in child]


class BlockOffload:
    """Counts each block's frozen weights on the device only while the offload holds them there:
    `tracker` (memory/simulate.LiveBytes) stops counting them, and hooks add and drop them."""

    def __init__(self, tracker: Any, denoiser: torch.nn.Module, mode: str):
        from .offload import RESIDENT

        self.tracker, self.mode, self.resident_max = tracker, mode, RESIDENT
        self.blocks = blocks(denoiser)
        self.sizes = [tracker.offload([t for p in [*b.parameters(), *b.buffers()] if not p.requires_grad
                                       for t in inner_tensors(p)]) for b in self.blocks]
        self.on: list[int] = []  # blocks on the device, oldest first
        self.held: int | None = None  # diffusers: the recomputed block whose backward autograd runs now
        for index, block in enumerate(self.blocks):
            block.register_forward_pre_hook(lambda _m, _a, i=index: self.pre_forward(i))
            block.register_forward_hook(lambda _m, _a, _o, i=index: self.post_forward(i))

    def load(self, index: int) -> None:
        if index < len(self.blocks) and index not in self.on:
            self.on.append(index)
            self.tracker.add(self.sizes[index])

    def unload(self, index: int) -> None:
        if index in self.on:
            self.on.remove(index)
            self.tracker.add(-self.sizes[index])

    def pre_forward(self, index: int) -> None:
        if self.mode == "swap":
            self.load(index)
            while len(self.on) > self.resident_max:
                self.unload(self.on[0])
            return
        if self.held is not None:  # the previous recomputed block's backward is over
            self.unload(self.held)
            self.held = None
        self.load(index)
        self.load(index + 1)  # the stream's prefetch

    def post_forward(self, index: int) -> None:
        if self.mode == "swap":
            return
        if torch._C._current_graph_task_id() != -1:  # recomputed in backward: autograd still needs it
            self.held = index
        else:
            self.unload(index)
