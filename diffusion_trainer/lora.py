"""The LoRA on the denoiser: attach it, and keep its EMA."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from diffusers.training_utils import EMAModel, cast_training_params
from peft import LoraConfig


def attach_lora(denoiser: torch.nn.Module, rank: int, alpha: int,
                target_modules: tuple[str, ...]) -> list[torch.nn.Parameter]:
    """Freeze the denoiser, add a LoRA (B = 0, so training starts from the base model), keep
    the trainable LoRA weights in fp32 whatever the base dtype, and return them."""
    denoiser.requires_grad_(False)
    denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                    target_modules=list(target_modules)))
    cast_training_params(denoiser, dtype=torch.float32)
    trainable = [p for p in denoiser.parameters() if p.requires_grad]
    if not trainable:
        raise RuntimeError(f"no LoRA target modules {target_modules} found in {type(denoiser).__name__}")
    return trainable


def lora_metadata(denoiser: torch.nn.Module) -> dict:
    """The adapter's PEFT config; saved in the safetensors header so loaders keep alpha."""
    return denoiser.peft_config["default"].to_dict()


class LoraEMA:
    """An exponential moving average of the LoRA weights (diffusers' EMAModel)."""

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
