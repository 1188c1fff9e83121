"""`offload: blocks`: the denoiser's repeated blocks keep their frozen weights in host memory and
bring them to the accelerator just before they run, at most two blocks at a time; the LoRA
weights, their gradients and optimizer states stay on the accelerator.

Not diffusers' `enable_group_offload`: it moves whole modules, so the LoRA weights inside a block
would be moved to the host after its forward (their gradients and the optimizer step would then be
on two devices), and with CUDA streams it restores each weight from a copy made when offloading
began, losing every update. Here only the frozen leaf modules move, and a block's weights leave
when a third block arrives (not after its forward): with gradient checkpointing a block runs again
in the backward pass, and PyTorch may stop that recomputation before the block's forward ends.
Without gradient checkpointing autograd would keep every block's weights for the backward pass
anyway, so the run turns it on with offload.
"""

from __future__ import annotations

from typing import Any

import torch

RESIDENT = 2  # the block running and the one before it (still needed by the recomputation's backward)


def repeated_blocks(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """Every block of the denoiser's ModuleLists of blocks (transformer_blocks, single_transformer_blocks,
    a UNet's down/up blocks…), in model order."""
    return [block for child in denoiser.children() if isinstance(child, torch.nn.ModuleList) for block in child]


def frozen_leaves(block: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of a block holding frozen weights of their own (LoRA's base layers, norms…)."""
    leaves = []
    for module in block.modules():
        own = [*module._parameters.values(), *module._buffers.values()]
        own = [t for t in own if t is not None]
        if own and not any(isinstance(t, torch.nn.Parameter) and t.requires_grad for t in own):
            leaves.append(module)
    return leaves


def own_tensors(module: torch.nn.Module) -> list[tuple[dict, str, torch.Tensor]]:
    return [(store, key, t) for store in (module._parameters, module._buffers) for key, t in store.items()
            if t is not None]


def plain(tensor: torch.Tensor) -> bool:
    return type(tensor) in (torch.Tensor, torch.nn.Parameter)


class BlockSwap:
    """The swap, installed by a forward pre-hook on each frozen leaf of each block (bringing its whole
    block over). Plain frozen tensors keep one host copy
    (pinned on CUDA) that is copied over and dropped again; quantized ones (torchao, bitsandbytes)
    move with their module's own `to`."""

    def __init__(self, denoiser: torch.nn.Module, device: torch.device):
        self.device = device
        self.blocks = repeated_blocks(denoiser)
        self.leaves = {id(b): frozen_leaves(b) for b in self.blocks}
        leaf_ids = {id(leaf) for leaves in self.leaves.values() for leaf in leaves}
        self.host: dict[int, torch.Tensor] = {}
        self.resident: list[torch.nn.Module] = []
        self.onloads = 0  # how many times a block's weights were brought over (tests, the log)
        pin = device.type == "cuda"
        for module in denoiser.modules():
            if id(module) not in leaf_ids:  # the LoRA, embeddings, final layers: on the device for good
                module._apply(lambda t: t.to(device), recurse=False)
                continue
            for _, _, tensor in own_tensors(module):
                if plain(tensor):
                    host = tensor.data.to("cpu")
                    self.host[id(tensor)] = host.pin_memory() if pin else host
            self.move(module, to_device=False)
        for block in self.blocks:  # on every leaf, not the block: a checkpointed unit inside a block (a
            for leaf in self.leaves[id(block)]:  # UNet's resnet) runs again in backward without the block
                leaf.register_forward_pre_hook(lambda _leaf, args, block=block: self.before(block, args))

    def move(self, leaf: torch.nn.Module, to_device: bool) -> None:
        if not all(plain(t) for _, _, t in own_tensors(leaf)):
            leaf._apply(lambda t: t.to(self.device if to_device else "cpu"), recurse=False)
            return
        for _, _, tensor in own_tensors(leaf):
            host = self.host[id(tensor)]
            tensor.data = host.to(self.device, non_blocking=True) if to_device else host

    def before(self, block: torch.nn.Module, args: Any) -> None:
        if any(b is block for b in self.resident):
            return
        for leaf in self.leaves[id(block)]:
            self.move(leaf, to_device=True)
        self.onloads += 1
        self.resident.append(block)
        while len(self.resident) > RESIDENT:
            for leaf in self.leaves[id(self.resident.pop(0))]:
                self.move(leaf, to_device=False)

    @property
    def host_bytes(self) -> int:
        from .storage import stored_bytes

        return sum(stored_bytes(leaf) for b in self.blocks for leaf in self.leaves[id(b)])


def stream_blocks(denoiser: torch.nn.Module, device: torch.device) -> BlockSwap:
    """Install the swap on a denoiser whose LoRA is attached; returns it."""
    swap = BlockSwap(denoiser, device)
    denoiser._block_swap = swap
    return swap
