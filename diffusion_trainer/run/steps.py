"""How many global optimizer steps a run makes: one step is one batch on every process, times the
gradient accumulation (global batch = train_batch_size x processes x accumulation)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StepPlan:
    """Counts of global optimizer steps: one step = one batch on every process, times the
    gradient accumulation (global batch = train_batch_size x processes x accumulation)."""

    updates_per_epoch: int
    total_steps: int
    num_epochs: int


def plan_steps(batches_per_process: int, gradient_accumulation_steps: int, epochs: int,
               max_train_steps: int) -> StepPlan:
    """`batches_per_process`: one process's batches an epoch (the loader's len())."""
    updates_per_epoch = max(1, math.ceil(batches_per_process / gradient_accumulation_steps))
    total_steps = epochs * updates_per_epoch
    if max_train_steps:  # as in diffusers' scripts, it decides the length: more epochs, or fewer
        total_steps = max_train_steps
    return StepPlan(updates_per_epoch, total_steps, math.ceil(total_steps / updates_per_epoch))


def clamp_accumulation(accelerator: Any, batches: int, reporter: Any) -> int:
    """The accumulation in force: an epoch's end ends an accumulation (accelerate syncs there), so
    asking for more than an epoch's batches accumulates those batches; the loss is then divided by
    their number, not by the larger value (DeepSpeed keeps its own config's)."""
    from accelerate.utils import DistributedType

    asked = accelerator.gradient_accumulation_steps
    if asked <= batches or accelerator.distributed_type == DistributedType.DEEPSPEED:
        return asked
    reporter.info(f"gradient_accumulation_steps={asked} is more than the {batches} batches of an epoch"
                  f"{' per process' if accelerator.num_processes > 1 else ''}: each optimizer step accumulates "
                  f"those {batches} (an epoch's end ends an accumulation).")
    accelerator.gradient_accumulation_steps = batches
    return batches
