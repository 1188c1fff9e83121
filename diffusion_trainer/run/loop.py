"""The training loop: one pass over batches, with no architecture names in it.

A resumed run starts at `start` (step, epoch, batches of that epoch already trained) and skips
those batches; `checkpoints` (checkpoint.Checkpoints) writes one every N steps. The last one (at
the end, or at a stop) is written by train.py after the adapter: a stop has seconds left, and the
adapter is what the user wants.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data.prior import merged
from ..objectives import weighted_loss

LOG_EVERY_STEPS = 10  # the loss is read (a host sync) this often, or once a second if slower


@dataclass
class Training:
    """Everything the loop touches, prepared by `train.py`."""

    accelerator: Any
    family: Any
    denoiser: torch.nn.Module  # as accelerate prepared it (may be wrapped)
    trainable: list[torch.nn.Parameter]
    optimizer: Any
    lr_scheduler: Any
    dataloader: Any
    samples: Any
    inputs: Any
    evaluator: Any
    reporter: Any
    ema: Any
    loss_type: str
    huber_c: float
    max_grad_norm: float
    num_epochs: int
    total_steps: int
    start: Any = None  # checkpoint.RunState of a resumed run; None: from the beginning
    checkpoints: Any = None  # checkpoint.Checkpoints, or None
    # trained besides the denoiser (text encoders): put in train mode, and their gradients averaged
    # across processes here, since accelerate's DDP wraps only the denoiser
    also_trained: list[torch.nn.Module] = field(default_factory=list)
    hand_synced: list[torch.nn.Parameter] = field(default_factory=list)
    prior_loss_weight: float = 0.0  # weighs the class half of batches that have one (prior preservation)


@dataclass
class Outcome:
    steps: int = 0
    epochs: int = 0
    stopped: bool = False
    position: int = 0  # batches of epoch `epochs` trained when the loop ended
    checkpointed_step: int = -1  # the step of the last checkpoint the loop wrote
    losses: list[tuple[int, float]] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)  # monotonic: start, first_step, end

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1][1] if self.losses else None


def batch_loss(t: Training, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the loss, and with prior preservation its [instance, prior] parts): one pass over the
    instance rows and their class partners together, the loss split in two (as diffusers' DreamBooth)."""
    batch, instances = merged(batch)
    latents = t.inputs.latents(batch)
    conditioning = t.inputs.conditioning(batch) if instances is None else t.inputs.conditioning(batch, instances)
    noisy = t.family.noisy_input_and_target(latents)
    prediction = t.family.predict(t.denoiser, noisy, conditioning, batch)
    mask = t.inputs.loss_mask(batch, latents)  # masked_loss: None, or B x 1 x h x w on the latent grid
    if instances is None:
        return weighted_loss(prediction, noisy.target, noisy.loss_weights, t.loss_type, t.huber_c, mask), None
    weights = noisy.loss_weights
    parts = torch.stack([weighted_loss(prediction[rows], noisy.target[rows], None if weights is None else weights[rows],
                                       t.loss_type, t.huber_c, None if mask is None else mask[rows])
                         for rows in (slice(None, instances), slice(instances, None))])
    return parts[0] + t.prior_loss_weight * parts[1], parts


def epoch_batches(t: Training, epoch: int, skip: int) -> Any:
    """The epoch's batches, in its own order, less the first `skip` (trained before a resume)."""
    from accelerate import skip_first_batches

    loader = skip_first_batches(t.dataloader, skip) if skip else t.dataloader
    (loader if hasattr(loader, "set_epoch") else t.samples).set_epoch(epoch)
    return loader


def average_gradients(parameters: list[torch.nn.Parameter], processes: int) -> None:
    """What DDP does for the denoiser: each gradient becomes its mean over the processes."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= processes
    offset = 0
    for p, g in zip(parameters, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def checkpoint_due(t: Training, step: int) -> bool:
    return t.checkpoints is not None and t.checkpoints.due(step)


def run(t: Training) -> Outcome:
    acc = t.accelerator
    first_epoch, skip = (t.start.epoch, t.start.batches_done) if t.start else (1, 0)
    out = Outcome(steps=t.start.step if t.start else 0, epochs=first_epoch - 1)
    window_loss, window_batches, last_read = torch.zeros((), device=acc.device), 0, time.monotonic()
    window_parts = torch.zeros(2, device=acc.device)  # instance and prior losses, with prior preservation
    for module in (t.denoiser, *t.also_trained):
        module.train()
    t.reporter.begin(t.total_steps)
    out.timing["start"] = time.monotonic()
    try:
        if out.steps >= t.total_steps:
            return out
        if t.reporter.stop_requested():  # asked during the image before training: no step
            out.stopped = True
            return out
        for epoch in range(first_epoch, t.num_epochs + 1):
            out.epochs = epoch
            position, batches = skip, epoch_batches(t, epoch, skip)
            skip = 0
            for batch in batches:
                with acc.accumulate(t.denoiser):
                    loss, parts = batch_loss(t, batch)
                    acc.backward(loss)  # accelerate divides by the accumulation steps
                    if acc.sync_gradients and t.hand_synced and acc.num_processes > 1:
                        average_gradients(t.hand_synced, acc.num_processes)
                    if acc.sync_gradients and t.max_grad_norm > 0:
                        # What acc.clip_grad_norm_ does for DDP and single devices, without its
                        # per-call version and DTensor checks.
                        acc.unscale_gradients()
                        torch.nn.utils.clip_grad_norm_(t.trainable, t.max_grad_norm)
                    t.optimizer.step()
                    t.lr_scheduler.step()
                    t.optimizer.zero_grad(set_to_none=True)
                position += 1
                out.position = position
                window_loss += loss.detach()
                if parts is not None:
                    window_parts += parts.detach()
                window_batches += 1
                if not acc.sync_gradients:
                    continue
                out.steps += 1
                if "first_step" not in out.timing:
                    out.timing["first_step"] = time.monotonic()
                if t.ema is not None:
                    t.ema.step()
                t.reporter.advance(out.steps)
                done = out.steps >= t.total_steps
                if done or out.steps % LOG_EVERY_STEPS == 0 or time.monotonic() - last_read >= 1.0:
                    mean_loss = (window_loss / window_batches).item()
                    metrics = {"loss": mean_loss}
                    if parts is not None:
                        instance_loss, prior_loss = (window_parts / window_batches).tolist()
                        metrics.update({"loss/instance": instance_loss, "loss/prior": prior_loss})
                    window_loss.zero_()
                    window_parts.zero_()
                    window_batches, last_read = 0, time.monotonic()
                    out.losses.append((out.steps, mean_loss))
                    metrics["lr"] = t.lr_scheduler.get_last_lr()[0]
                    acc.log({**metrics, "epoch": epoch}, step=out.steps)
                    t.reporter.report(out.steps, t.total_steps, metrics)
                if t.reporter.stop_requested():
                    out.stopped = True
                if done or out.stopped:
                    return out
                if checkpoint_due(t, out.steps):
                    t.checkpoints.save(out.steps, epoch, position)
                    out.checkpointed_step = out.steps
                if t.evaluator.due_at_step(out.steps):
                    t.evaluator.run(f"step_{out.steps:06d}", out.steps)
                    if t.reporter.stop_requested():
                        out.stopped = True
                        return out
            if t.evaluator.due(epoch) and not t.evaluator.due_at_step(out.steps):  # not twice for one step
                t.evaluator.run(f"epoch_{epoch:04d}", out.steps)
                if t.reporter.stop_requested():  # asked during the eval image: stop before another step
                    out.stopped = True
                    return out
        return out
    finally:
        out.timing["end"] = time.monotonic()
        t.reporter.end_progress()
