"""One training step of a real-size model simulated with PyTorch's fake tensors: the family's own
`predict`, the trainer's loss, backward and an AdamW step, with no memory allocated.

What it counts: every tensor storage alive on the (simulated) accelerator, each rounded up to
512 bytes as CUDA's caching allocator does, from the LoRA's creation to the end of the optimizer
step. The base weights are built in bf16 (or fp32), then stored as a run stores them (fp8, int8,
nf4: memory/storage_sim.py), and counted too; offloaded blocks only while on the device. On a
CPU, autocast would run layer norms, softmax, exp and pow in bf16; CUDA runs them in fp32 (and
keeps those fp32 copies for backward), so those functions are upcast here as CUDA's autocast does. Not counted: the CUDA
context, allocator fragmentation, EMA's copy of the LoRA.
"""

from __future__ import annotations

import functools
import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

from ..lora import attach_lora
from ..objectives import NoisyBatch, weighted_loss

BLOCK = 512  # CUDA's caching allocator rounds every block up to this

# Functions CUDA's autocast runs in fp32 (torch.amp docs, "CUDA Ops that can autocast to float32")
# which diffusers' blocks call; CPU autocast leaves them in bf16.
CUDA_FP32_FUNCTIONS = {
    F.layer_norm, F.group_norm, F.softmax, F.log_softmax, F.mse_loss, F.normalize, F.softplus,
    torch.softmax, torch.log_softmax, torch.exp, torch.pow, torch.rsqrt, torch.sum, torch.cumsum,
    torch.norm, torch.log, torch.reciprocal,
    torch.Tensor.softmax, torch.Tensor.exp, torch.Tensor.pow, torch.Tensor.__pow__, torch.Tensor.rsqrt,
    torch.Tensor.sum, torch.Tensor.norm, torch.Tensor.log, torch.Tensor.reciprocal, torch.Tensor.cumsum,
}


class CudaFp32Functions(TorchFunctionMode):
    """Inside a CPU bf16 autocast, run CUDA's fp32-list functions in fp32, as CUDA autocast would."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in CUDA_FP32_FUNCTIONS and torch.is_autocast_enabled("cpu"):
            up = lambda x: x.float() if isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16) else x
            with torch.autocast("cpu", enabled=False):
                return func(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})
        if func is torch.Tensor.backward:  # a mode is off inside its own handler: keep it on for recomputation
            with self:
                loss = args[0]
                return torch.autograd.graph._engine_run_backward(
                    (loss,), (torch.ones_like(loss),), False, False, (), allow_unreachable=True, accumulate_grad=True)
        return func(*args, **kwargs)


class LiveBytes(TorchDispatchMode):
    """Bytes of every storage alive, and the highest value seen since `reset_peak`. A tensor
    subclass's wrapper (torchao's) holds no memory of its own: the plain tensors inside it are counted."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.seen: dict[int, tuple[Any, int]] = {}
        self.host: set[int] = set()  # storages kept in host memory (offloaded): not counted

    def reset_peak(self) -> None:
        self.peak = self.live

    def add(self, size: int) -> None:
        self.live += size
        self.peak = max(self.peak, self.live)

    def count(self, tensor: torch.Tensor) -> None:
        if is_traceable_wrapper_subclass(tensor):
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.seen or key in self.host:
            return
        size = -(-storage.nbytes() // BLOCK) * BLOCK

        def freed(_ref, key=key, size=size):
            if self.seen.pop(key, None) is not None:
                self.live -= size

        self.seen[key] = (weakref.ref(storage, freed), size)
        self.add(size)

    def offload(self, tensors: list[torch.Tensor]) -> int:
        """Stop counting these tensors' storages (they live in host memory); their bytes."""
        total = 0
        for tensor in tensors:
            key = tensor.untyped_storage()._cdata
            entry = self.seen.pop(key, None)
            if entry is not None:
                self.live -= entry[1]
                total += entry[1]
            self.host.add(key)
        return total

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.count(tensor)
        return out


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@contextmanager
def assigned_not_swapped() -> Iterator[None]:
    """Module.to() on fake parameters: assign `.data` instead of torch.utils.swap_tensors, which
    refuses the tensors the fake mode holds weakly."""
    original = torch.utils.swap_tensors

    def assign(t1: torch.Tensor, t2: torch.Tensor) -> None:
        t1.data = t2.detach()

    torch.utils.swap_tensors = assign
    try:
        yield
    finally:
        torch.utils.swap_tensors = original


def cast_saved_buffers(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Floating buffers saved in the checkpoint (SD3's position table) load in the model's dtype;
    from_config builds them in fp32. Replaced, not `.data`-assigned: a view's base would stay alive."""
    saved = set(model.state_dict())
    for name, buffer in list(model.named_buffers()):
        if buffer.is_floating_point() and buffer.dtype != dtype and name in saved:
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = buffer.to(dtype)


@dataclass(frozen=True)
class SimulatedStep:
    weights_gb: float  # the base, the LoRA and its AdamW moments, before the step
    peak_gb: float  # the most alive at once during forward, backward and the optimizer step


def denoiser_class(library_class: str) -> type:
    import diffusers

    return getattr(diffusers, library_class)


class FakePipeline(SimpleNamespace):
    """A bare namespace whose missing attributes are the pipeline class's own helpers (Chroma's
    `_prepare_attention_mask`), called on it."""

    def __getattr__(self, name: str) -> Any:
        return functools.partial(getattr(self.__dict__["pipeline_class"], name), self)


def fake_family(family_cls: type, denoiser: torch.nn.Module, vae_scale_factor: int, guidance: float | None) -> Any:
    """The family's own object around a bare denoiser: enough for `predict`."""
    family = family_cls.__new__(family_cls)
    family.pipeline = FakePipeline(**{family_cls.denoiser_attr: denoiser}, vae_scale_factor=vae_scale_factor,
                                   pipeline_class=family_cls.pipeline_class)
    family.guidance = guidance
    return family


def simulate_step(family_cls: type, class_name: str, denoiser_config: dict, *, latent_channels: int,
                  resolution: int, batch_size: int, text: dict[str, tuple[int, ...]], rank: int, alpha: int,
                  lora_layers: str, base_dtype: torch.dtype, checkpointing: bool, autocast: bool,
                  latent_shape: tuple[int, int, int] | None = None, storage: str | None = None,
                  offload: str = "none") -> SimulatedStep:
    """Peak bytes of one step. `text` gives each conditioning tensor's shape without the batch (a name
    ending in "mask": an all-true mask); `latent_shape` the model input's (default: latent_channels at 1/8);
    `storage` (fp8, int8, nf4) the frozen base's form, applied to a `base_dtype` model
    (memory/storage_sim.py); `offload` counts its blocks as an offload holds them on the device:
    `swap` this trainer's block swap (memory/offload.py), `diffusers` diffusers' group offload with streams."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .storage_sim import BlockOffload, apply_storage

    gb = 1e9
    tracker = LiveBytes()
    with ExitStack() as stack:
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        stack.enter_context(assigned_not_swapped())
        stack.enter_context(tracker)
        stack.enter_context(CudaFp32Functions())  # also while backward recomputes checkpointed blocks
        with default_dtype(base_dtype):
            denoiser = denoiser_class(class_name).from_config(denoiser_config)
        cast_saved_buffers(denoiser, base_dtype)
        if storage is not None:
            apply_storage(denoiser, storage)
        denoiser.train()
        family = fake_family(family_cls, denoiser, 8, 1.0 if denoiser_config.get("guidance_embeds") else None)
        targets = family.lora_targets(lora_layers)  # the family's own resolution (FLUX.2 names full paths)
        trainable = attach_lora(denoiser, rank, alpha, targets)
        if checkpointing:
            denoiser.enable_gradient_checkpointing()
        if offload != "none":
            BlockOffload(tracker, denoiser, offload)
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=False)  # as CUDA's fused AdamW: no temporaries
        side = resolution // 8
        latents = torch.randn(batch_size, *(latent_shape or (latent_channels, side, side)), dtype=torch.float32)
        noisy = NoisyBatch(model_input=latents.to(base_dtype), target=torch.randn_like(latents),
                           timesteps=torch.full((batch_size,), 500.0), sigmas=torch.full((batch_size,), 0.5))
        conditioning = {name: torch.ones(batch_size, *shape, dtype=torch.bool) if name.endswith("mask")
                        else torch.randn(batch_size, *shape, dtype=base_dtype) for name, shape in text.items()}
        size = torch.full((batch_size, 2), float(resolution))
        batch = {"original_size": size, "crop_top_left": torch.zeros(batch_size, 2), "target_size": size}
        for parameter in trainable:  # a step already taken: AdamW's two moments exist, as in every later step
            parameter.grad = torch.zeros_like(parameter)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        weights = tracker.live
        tracker.reset_peak()
        with ExitStack() as amp:
            if autocast:
                amp.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
            prediction = family.predict(denoiser, noisy, conditioning, batch)
            loss = weighted_loss(prediction, noisy.target, None)
        del prediction
        loss.backward()
        del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return SimulatedStep(weights / gb, tracker.peak / gb)


def conditioning_shapes(family_cls: type, components: dict, prompt_tokens: int) -> dict[str, tuple[int, ...]]:
    """What the family's text encoders hand the denoiser, per sample (from the denoiser's config)."""
    config = components[family_cls.denoiser_attr].config
    own = family_cls.conditioning_shapes(config, prompt_tokens)
    if own is not None:
        return own
    if family_cls.denoiser_attr == "unet":
        shapes = {"encoder_hidden_states": (prompt_tokens, config["cross_attention_dim"])}
        if config.get("addition_embed_type") == "text_time":
            shapes["text_embeds"] = (config["projection_class_embeddings_input_dim"]
                                     - 6 * config["addition_time_embed_dim"],)
        return shapes
    return {"encoder_hidden_states": (prompt_tokens, config["joint_attention_dim"]),
            "pooled_projections": (config["pooled_projection_dim"],)}


def simulate_run(source: str, *, resolution: int, batch_size: int, rank: int, lora_layers: str,
                 checkpointing: bool, max_sequence_length: int = 77, base_precision: str = "bf16",
                 offload: str = "none") -> SimulatedStep:
    """One training step, bf16 compute, of the pipeline whose configs lie in `source` (a folder),
    its frozen base stored as `base_precision` (bf16, fp8, int8, nf4), its blocks offloaded
    (`offload`: none, swap, diffusers) or not."""
    from ..families import family_for
    from .components import pipeline_components

    family_cls = family_for(source)
    components = pipeline_components(source, (family_cls.denoiser_attr, "vae"))
    denoiser = components[family_cls.denoiser_attr]
    tokens = family_cls.prompt_tokens(max_sequence_length)
    vae_config = components["vae"].config
    return simulate_step(family_cls, denoiser.class_name, denoiser.config,
                         latent_channels=family_cls.latent_shape(vae_config, resolution)[0], resolution=resolution,
                         batch_size=batch_size, text=conditioning_shapes(family_cls, components, tokens), rank=rank,
                         alpha=rank, lora_layers=lora_layers, base_dtype=torch.bfloat16, checkpointing=checkpointing,
                         autocast=True, latent_shape=family_cls.latent_shape(vae_config, resolution),
                         storage=None if base_precision == "bf16" else base_precision, offload=offload)
