"""The optimizer for the LoRA weights (`optimizer`), checked before any weights are loaded.

adamw      torch's AdamW (fused on CUDA): adam_beta1/2, adam_weight_decay, adam_epsilon.
adamw8bit  bitsandbytes' 8-bit AdamW, same settings, about a quarter of AdamW's state memory
           (bitsandbytes is in requirements.txt; it has a CPU backend too).
prodigy    Prodigy (Mishchenko & Defazio 2023, the prodigyopt package): estimates the step size
           itself, so learning_rate is a multiplier that should stay 1.0. Bias correction and
           warmup safeguard on, as diffusers' LoRA scripts recommend.
adafactor  transformers' Adafactor with the given learning_rate (no relative step, no parameter
           scaling) and adam_weight_decay: factored second moments, little state memory.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from ..errors import InputError


def check_optimizer(params: Any, reporter: Any) -> None:
    """Refuse an optimizer this machine cannot run, before heavy work; warn about odd settings."""
    if params.optimizer == "adamw8bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise InputError("optimizer: adamw8bit needs the bitsandbytes package, which is not installed "
                             "(pip install bitsandbytes); or choose adamw, prodigy or adafactor.")
    if params.optimizer == "prodigy":
        if importlib.util.find_spec("prodigyopt") is None:
            raise InputError("optimizer: prodigy needs the prodigyopt package, which is not installed "
                             "(pip install prodigyopt); or choose adamw or adafactor.")
        if params.learning_rate != 1.0:
            reporter.warn(f"optimizer=prodigy finds its own step size; learning_rate={params.learning_rate:g} "
                          "multiplies it (1.0 is the usual value).")


def make_optimizer(trainable: list[torch.nn.Parameter], params: Any, device: torch.device) -> torch.optim.Optimizer:
    betas = (params.adam_beta1, params.adam_beta2)
    if params.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(trainable, lr=params.learning_rate, betas=betas,
                                   weight_decay=params.adam_weight_decay, eps=params.adam_epsilon)
    if params.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(trainable, lr=params.learning_rate, betas=betas, weight_decay=params.adam_weight_decay,
                       eps=params.adam_epsilon, decouple=True, use_bias_correction=True, safeguard_warmup=True)
    if params.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(trainable, lr=params.learning_rate, weight_decay=params.adam_weight_decay,
                         relative_step=False, scale_parameter=False, warmup_init=False)
    return torch.optim.AdamW(trainable, lr=params.learning_rate, betas=betas, weight_decay=params.adam_weight_decay,
                             eps=params.adam_epsilon, fused=device.type == "cuda")
