"""Training on several processes (GPUs, machines) through accelerate.

Started by `accelerate launch` or `torchrun`, every process runs the whole of main.py on its
own shard of each epoch. This module holds what differs from one process: who this process
is, its noise stream, how accelerate is set up for several processes, decisions the main
process makes for all, and the reporter that lets only the main process speak (terminal,
Transformer Lab) while every process agrees on when to stop.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch

from ..reporting import Reporter
from ..seeds import process_seed

# Set by torchrun / accelerate launch (RANK), or by MPI launchers (accelerate's multi-CPU mode).
RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
# Optimizer steps between the processes' agreement on a stop request. Every step: the Lab's Stop
# sends SIGTERM and SIGKILL 3 s later, and the agreement (one broadcast int) costs little.
STOP_CHECK_EVERY = 1
# How long a process waits in a collective for the others: the default 10 minutes is shorter than
# one process encoding a large SDXL/Flux dataset into the disk latent cache while the rest wait.
PROCESS_GROUP_TIMEOUT = timedelta(hours=4)


def _first_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return default


def process_index() -> int:
    """This process's global rank, read from the launcher's environment (0 when not launched)."""
    return _first_int(RANK_VARIABLES, 0)


def num_processes() -> int:
    """How many processes the launcher started (1 when not launched), before accelerate is set up."""
    return _first_int(WORLD_SIZE_VARIABLES, 1)


def processes_on_this_machine() -> int:
    """How many of the launcher's processes share this machine's RAM (LOCAL_WORLD_SIZE; 1 when not launched)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)


def is_main_process() -> bool:
    return process_index() == 0


def launched_distributed() -> bool:
    """True under torchrun / accelerate launch with several processes (accelerate's own test)."""
    return int(os.environ.get("LOCAL_RANK", -1)) != -1 or _first_int(WORLD_SIZE_VARIABLES, 1) > 1


def seed_this_process(seed: int, process_index: int) -> None:
    """Called after the model and its LoRA weights exist (drawn alike on every process); a resume
    then restores each process's own RNG state (random_states_<k>.pkl) over it."""
    from accelerate.utils import set_seed

    set_seed(process_seed(seed, process_index))


def accelerator_kwargs() -> dict[str, Any]:
    """A process-group timeout of PROCESS_GROUP_TIMEOUT. On a machine without CUDA, accelerate only
    sets up gloo (CPU) process groups when told cpu=True; otherwise every launched process would
    train alone on all the data."""
    from accelerate.utils import InitProcessGroupKwargs

    kwargs: dict[str, Any] = {"kwargs_handlers": [InitProcessGroupKwargs(timeout=PROCESS_GROUP_TIMEOUT)]}
    if launched_distributed() and not torch.cuda.is_available():
        kwargs["cpu"] = True
    return kwargs


def refuse_unsupported(accelerator: Any, train_text_encoder: bool = False) -> None:
    """FSDP (from an `accelerate config`) shards the frozen base weights too, which the adapter
    saving and the eval images here read whole: refuse it before anything is loaded. DDP and
    DeepSpeed (ZeRO-1/2 keep every weight whole on every GPU) are fine, but DeepSpeed's engine
    holds one model, so text-encoder adapters are refused under it."""
    from accelerate.utils import DistributedType

    from ..errors import InputError

    if accelerator.distributed_type == DistributedType.FSDP:
        raise InputError("accelerate config: FSDP is not supported for LoRA training here (the adapter is "
                         "saved and eval images are drawn from whole weights). Use plain multi-GPU (DDP) or "
                         "DeepSpeed ZeRO stage 1/2: run `accelerate config` again, or launch with "
                         "`accelerate launch --multi_gpu`.")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        stage = accelerator.state.deepspeed_plugin.zero_stage
        if stage == 3:
            raise InputError("accelerate config: DeepSpeed ZeRO stage 3 shards the weights, which the adapter "
                             "saving and eval images here read whole; use ZeRO stage 1 or 2.")
        if train_text_encoder:
            raise InputError("train_text_encoder: not supported under DeepSpeed here (its engine trains one "
                             "model, the denoiser); turn it off, or launch plain multi-GPU (DDP).")


def already_sharded(loader: Any, accelerator: Any) -> Any:
    """`loader` as accelerate prepares it for one process (batches moved to the device, the
    epoch's end marked for gradient accumulation), but not sharded again: its batch sampler
    already yields this process's share of an exact plan (`data.buckets.BucketBatchSampler`), where
    accelerate's `BatchSamplerShard` would drop a short round and top it up from the epoch's
    first batches, whatever their shape. Marked as prepared, so `accelerator.prepare` only
    registers it. No RNG is synchronised: the order is a pure function of (seed, epoch)."""
    from accelerate.data_loader import prepare_data_loader

    prepared = prepare_data_loader(loader, accelerator.device, num_processes=1, process_index=0,
                                   put_on_device=accelerator.device_placement, rng_types=None,
                                   non_blocking=accelerator.non_blocking)
    prepared._is_accelerate_prepared = True
    return prepared


def loop_clipping(accelerator: Any, max_grad_norm: float) -> tuple[float, str | None]:
    """(the max_grad_norm the loop clips to itself, a warning). Under DeepSpeed the engine steps the
    optimizer inside accelerator.backward, so a clip in the loop would come after the update; the
    engine clips to its config's gradient_clipping instead, which accelerate fills with 1.0 when it
    says "auto". So hand it max_grad_norm (before accelerator.prepare) and clip nothing in the loop."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return max_grad_norm, None
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    configured = config.get("gradient_clipping", "auto")
    if configured == "auto":
        config["gradient_clipping"] = max_grad_norm  # 0: DeepSpeed does not clip
        return 0.0, None
    if float(configured) != max_grad_norm:
        return 0.0, (f"max_grad_norm={max_grad_norm} is not used: the DeepSpeed config sets gradient_clipping="
                     f"{configured}, which DeepSpeed applies (set it to \"auto\" to use max_grad_norm).")
    return 0.0, None


def decided_on_main(accelerator: Any, decision: Any) -> Any:
    """The main process's `decision` (computed there alone), the same on every process."""
    return same_on_every_process(accelerator, lambda: decision)


class ProcessReporter:
    """The run's reporter as one of several processes sees it. The main process's calls go to
    the real reporter; the others' go to a silent terminal reporter (no Lab, no messages, no
    progress bar). stop_requested() answers the same in every process: every STOP_CHECK_EVERY
    calls (one per optimizer step) the main process's answer is broadcast, so all processes
    leave the loop at the same step and none waits forever in a collective. So every process
    must ask it at the same points (never under `if is_main_process`)."""

    def __init__(self, reporter: Any, main: bool):
        self._real = reporter
        self._inner = reporter if main else SilentReporter()
        self._main = main
        self._calls = 0
        self._stopping = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def failed(self, message: str) -> None:
        """The main process ends the job; another process's failure reaches it too (marked with the
        process), where the real reporter can write the job from a non-main process (the Lab's)."""
        if self._main:
            self._inner.failed(message)
        elif hasattr(self._real, "failed_in_another_process"):
            self._real.failed_in_another_process(f"Process {process_index()} failed: {message}")

    def checkpoint_to_resume(self) -> Any:
        """A read: every process resumes from the same checkpoint."""
        return self._real.checkpoint_to_resume() if hasattr(self._real, "checkpoint_to_resume") else None

    def stop_requested(self) -> bool:
        self._calls += 1
        if not self._stopping and self._calls % STOP_CHECK_EVERY == 0:
            wanted = bool(self._inner.stop_requested()) if self._main else False
            self._stopping = _broadcast_flag(wanted)
        return self._stopping


def _broadcast_flag(flag: bool) -> bool:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    from accelerate import PartialState

    value = torch.tensor([int(flag)], device=PartialState().device)
    dist.broadcast(value, src=0)
    return bool(value.item())


class SilentReporter(Reporter):
    """The other processes' reporter: the terminal reporter with nothing to say."""

    def info(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    def begin(self, total_steps: int) -> None:
        pass

    def advance(self, step: int) -> None:
        pass

    def report(self, step: int, total: int, metrics: dict[str, float]) -> None:
        pass

    def end_progress(self) -> None:
        pass


def reporter_for_this_process(reporter: Any) -> Any:
    """The reporter itself in a single process; a ProcessReporter under a distributed launch."""
    if not launched_distributed():
        return reporter
    return ProcessReporter(reporter, is_main_process())


def same_on_every_process(accelerator: Any, decide: Any) -> Any:
    """`decide()` run on the main process, its (picklable) answer given to every process."""
    if accelerator.num_processes == 1:
        return decide()
    from accelerate.utils import broadcast_object_list

    answer = [decide() if accelerator.is_main_process else None]
    broadcast_object_list(answer, from_process=0)
    return answer[0]
