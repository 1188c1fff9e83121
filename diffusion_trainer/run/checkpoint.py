"""Checkpoints: everything a run needs to continue as if it had never stopped.

A checkpoint is accelerate's `save_state` folder: the optimizer, LR scheduler, GradScaler and every
RNG state (python, numpy, torch, CUDA), plus what we register with it: the LoRA weights (as
safetensors, through a save/load hook, instead of the whole denoiser), the EMA and a `RunState`
(step, epoch, batches of that epoch already trained, the seed the data order derives from). The
data order is a pure function of (seed, epoch) (`data.buckets.BucketBatchSampler`), so a resumed run skips
the batches already trained and sees the rest in the same order. `run_parameters.json` records the
parameters; a resume that changes one that matters is refused by name.

Folders: <checkpoints_dir>/<run id>/checkpoint-<step>: each run keeps its checkpoints apart (a resume
continues in its checkpoint's run folder), so one run never prunes or overwrites another's. Each is
written beside as `.checkpoint-<step>.partial-*` and renamed into place (atomic.commit), so
`latest` never finds half a checkpoint; a checkpoint damaged later (a truncated file) is named on an
explicit resume and skipped, with a note, by `latest`. Checkpoints of older versions, directly in
<checkpoints_dir>, are still found.

Test hook: DIFFUSION_TRAINER_TEST_CHECKPOINT_SLEEP=<seconds> sleeps inside each checkpoint write
(after the files, before the rename), so a test can kill a run mid-write.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .. import atomic
from ..errors import InputError

PREFIX = "checkpoint-"
PARAMETERS_NAME = "run_parameters.json"
LORA_NAME = "lora_weights.safetensors"
TEST_SLEEP_ENV = "DIFFUSION_TRAINER_TEST_CHECKPOINT_SLEEP"

# Parameters a resume may change: they alter how long the run goes on, or what it shows and where,
# never what the steps already taken would have been. Any other difference is refused.
SAFE_TO_CHANGE = frozenset({
    "num_train_epochs", "max_train_steps", "eval_prompt", "eval_steps", "eval_num_inference_steps",
    "eval_guidance_scale", "eval_num_images", "eval_every_n_steps", "eval_also_without_ema", "log_to_wandb", "checkpointing_steps", "checkpoints_total_limit",
    "resume_from_checkpoint", "output_dir", "dataset_name", "cache_memory_budget_mb", "cache_latents",
    "cache_text_embeddings", "torch_compile", "gradient_checkpointing", "skip_bad_images",
    "enable_xformers_memory_efficient_attention", "allow_files_outside_dataset", "class_data_dir",
})
# cache_latents / cache_text_embeddings / dataset_name / class_data_dir: the same data by other means or from another
# place; the data's contents are compared through their fingerprint instead. cache_latents only while
# nothing is augmented at random: cached variants are other draws than fresh augmentation.
# num_train_epochs / max_train_steps: the learning-rate schedule then follows the new length from the
# resumed step on (continue_schedule).


@dataclass
class RunState:
    """Where the run is, registered with accelerate as a custom checkpoint object."""

    step: int = 0  # optimizer steps done
    epoch: int = 1  # the epoch in progress
    batches_done: int = 0  # dataloader batches of that epoch already trained
    seed: int = 0  # the data order of an epoch is a function of (seed, epoch)

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


def checkpoint_step(path: Path) -> int | None:
    match = re.fullmatch(rf"{PREFIX}(\d+)", path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def existing(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder` (one run's folder), oldest step first."""
    if not folder.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in folder.iterdir()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


def new_run_folder(checkpoints_dir: Path) -> Path:
    """A run folder no other run uses: run-<date>-<time>[-n]."""
    stamp = time.strftime("run-%Y%m%d-%H%M%S")
    candidate, n = checkpoints_dir / stamp, 1
    while candidate.exists():
        n += 1
        candidate = checkpoints_dir / f"{stamp}-{n}"
    return candidate


def run_folders(checkpoints_dir: Path) -> list[Path]:
    """The runs' checkpoint folders under `checkpoints_dir`, oldest first (run ids sort by time);
    `checkpoints_dir` itself first when it holds checkpoints of older versions."""
    if not checkpoints_dir.is_dir():
        return []
    runs = sorted(p for p in checkpoints_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and checkpoint_step(p) is None)
    return ([checkpoints_dir] if existing(checkpoints_dir) else []) + runs


def all_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Every complete checkpoint of this adapter, newest run's newest step last."""
    return [c for run in run_folders(checkpoints_dir) for c in existing(run)]


class CheckpointDamaged(InputError):
    pass


def verify(path: Path, process_index: int = 0) -> list[str]:
    """Read every file of checkpoint `path` through; raise CheckpointDamaged naming the first that
    does not load. Returns notes on what is missing but not needed (the RNG state)."""
    def damaged(name: str, why: str) -> CheckpointDamaged:
        return CheckpointDamaged(f"resume_from_checkpoint: {path / name} {why}; this checkpoint cannot be resumed. "
                                 "Resume from an earlier one (or 'latest', which skips damaged ones), or start fresh.")

    try:
        recorded = json.loads((path / PARAMETERS_NAME).read_text())
        if not isinstance(recorded, dict) or not isinstance(recorded.get("parameters"), dict):
            raise ValueError("it holds no 'parameters' object")
    except FileNotFoundError:
        raise damaged(PARAMETERS_NAME, "is missing") from None
    except (OSError, ValueError) as exc:
        raise damaged(PARAMETERS_NAME, f"is not a valid run record ({exc})") from None
    try:
        load_file(str(path / LORA_NAME))
    except FileNotFoundError:
        raise damaged(LORA_NAME, "is missing") from None
    except Exception as exc:  # safetensors raises its own SafetensorError on a truncated file
        raise damaged(LORA_NAME, f"is damaged ({exc})") from None
    for file in sorted(path.glob("*.bin")) + sorted(path.glob("*.pkl")):
        try:
            torch.load(file, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise damaged(file.name, f"is damaged ({type(exc).__name__}: {exc})") from None
    if not (path / "optimizer.bin").is_file():
        raise damaged("optimizer.bin", "is missing")
    if not (path / f"random_states_{process_index}.pkl").is_file():
        return [f"{path} holds no random state (random_states_{process_index}.pkl): the resumed run continues with "
                "fresh noise and augmentation draws, so it is not an exact continuation of the stopped one."]
    return []


def resolve(setting: str, checkpoints_dir: Path, reporter: Any) -> tuple[Path | None, list[str]]:
    """The checkpoint `resume_from_checkpoint` names (None: start fresh), and notes about it."""
    setting = setting.strip()
    if not setting:
        return None, []
    if setting == "latest":
        found = all_checkpoints(checkpoints_dir)
        if not found:
            reporter.info(f"resume_from_checkpoint=latest: no checkpoint in {checkpoints_dir} yet; starting fresh.")
            return None, []
        for candidate in reversed(found):
            try:
                return candidate, verify(candidate)
            except CheckpointDamaged as exc:
                reporter.warn(f"{exc} Trying the one before it.".replace("resume_from_checkpoint: ", "", 1))
        reporter.warn(f"resume_from_checkpoint=latest: every checkpoint in {checkpoints_dir} is damaged; "
                      "starting fresh.")
        return None, []
    path = Path(setting).expanduser()
    if not (path / PARAMETERS_NAME).is_file() and not (path / LORA_NAME).is_file():
        raise InputError(f"resume_from_checkpoint: '{setting}' is not a checkpoint folder (no {PARAMETERS_NAME} "
                         f"in it); use 'latest', a folder like {checkpoints_dir / 'run-20260101-120000' / (PREFIX + '500')}, "
                         "or leave it empty.")
    return path, verify(path)


def run_folder_for(resume_from: Path | None, checkpoints_dir: Path) -> Path:
    """Where this run writes its checkpoints: a resume continues in its checkpoint's run folder."""
    if resume_from is not None and resume_from.parent.parent.resolve() == checkpoints_dir.resolve():
        return resume_from.parent
    return new_run_folder(checkpoints_dir)


def processes_record(num_processes: int, train_batch_size: int, gradient_accumulation_steps: int) -> dict[str, int]:
    """What a checkpoint records of the processes that trained it."""
    return {"num_processes": num_processes,
            "global_batch": train_batch_size * num_processes * gradient_accumulation_steps}


def check_processes(path: Path, recorded: dict[str, Any], num_processes: int) -> None:
    """A checkpoint resumes only on as many processes as made it: the epoch's split into batches,
    the batches already trained and the step count all depend on it. (Checkpoints older than the
    record say nothing and are not checked.)"""
    before = recorded.get("num_processes")
    if before is None or before == num_processes:
        return
    raise InputError(
        f"resume_from_checkpoint: {path} was trained on {before} process(es) (global batch "
        f"{recorded.get('global_batch', '?')}), and this run has {num_processes}; continuing it would not be "
        f"the same run (other batches, steps and learning rates). Resume it with the same number of processes, "
        f"{before} (e.g. `accelerate launch --num_processes {before} main.py ...`, or on {before} GPU(s) for "
        "`python -m diffusion_trainer.launch`), or start a fresh run (resume_from_checkpoint empty).")


def compatibility_notes(path: Path, parameters: dict[str, Any], data_fingerprint: str,
                        num_processes: int = 1) -> list[str]:
    """What differs from the checkpoint's run (`parameters`: this run's, by name), as notes; raises
    InputError for what may not."""
    recorded = json.loads((path / PARAMETERS_NAME).read_text())
    check_processes(path, recorded, num_processes)
    before, now = recorded["parameters"], parameters
    refused, notes = [], []
    for name in sorted(set(before) | set(now)):
        if before.get(name) == now.get(name) or name == "resume_from_checkpoint":
            continue
        change = f"{name}: {before.get(name)!r} -> {now.get(name)!r}"
        safe = name in SAFE_TO_CHANGE or name not in before  # a parameter newer than the checkpoint
        (notes if safe else refused).append(change)
    augmented = random_augmentations(before)
    if before.get("cache_latents", now["cache_latents"]) != now["cache_latents"] and augmented:
        change = next(n for n in notes if n.startswith("cache_latents:"))
        notes.remove(change)
        refused.append(f"{change} (with random augmentation, {', '.join(augmented)}, the cached variants are "
                       "other images than augmenting afresh every step)")
    if recorded.get("data_fingerprint") != data_fingerprint:
        refused.append("dataset_name: the dataset's contents (images, captions or their order) differ "
                       "from the checkpoint's")
    if refused:
        raise InputError(
            f"resume_from_checkpoint: {path} was made with other settings, and continuing it with these "
            "would not be the same run:\n    " + "\n    ".join(refused) + "\n  Set them back, or start a "
            "fresh run (resume_from_checkpoint empty, or another adaptor_name). A resume may change only: "
            + ", ".join(sorted(SAFE_TO_CHANGE)) + ".")
    return notes


def random_augmentations(parameters: dict[str, Any]) -> list[str]:
    """The random augmentations a run's parameters switch on, by parameter name."""
    found = [name for name in ("random_flip", "color_jitter") if parameters.get(name)]
    if parameters.get("random_rotation") and parameters.get("rotation_prob", 0) > 0:
        found.append("random_rotation")
    if not parameters.get("center_crop", True):
        found.append("center_crop off (random crop)")
    return found


def continue_schedule(lr_scheduler: Any) -> list[tuple[float, float]]:
    """After a resume: the learning rate of the next step as the schedule built for this run's length
    gives it, instead of the one the checkpoint's optimizer holds (its own schedule's, when
    num_train_epochs or max_train_steps changed). (checkpoint's lr, this schedule's lr) per group."""
    inner = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it
    lambdas = getattr(inner, "lr_lambdas", None)
    if lambdas is None:
        return []
    groups = inner.optimizer.param_groups
    # as LambdaLR.get_lr computes it, so an unchanged schedule gives the same float
    rates = [base * rule(inner.last_epoch) for rule, base in zip(lambdas, inner.base_lrs)]
    changes = [(group["lr"], rate) for group, rate in zip(groups, rates)]
    for group, rate in zip(groups, rates):
        group["lr"] = rate
    inner._last_lr = list(rates)
    return changes


class Checkpoints:
    """Saves and loads checkpoints of one run through its accelerator."""

    def __init__(self, folder: Path, accelerator: Any, denoiser: torch.nn.Module, ema: Any, *, every: int, keep: int,
                 parameters: dict[str, Any], data_fingerprint: str, reporter: Any,
                 text_encoders: dict[str, torch.nn.Module] | None = None):
        """`every`: checkpointing_steps (0: none); `keep`: checkpoints_total_limit (0: all);
        `parameters`: the run's, recorded so a resume can tell what changed; `text_encoders`: those
        with a trained adapter, by attribute (their weights are saved as "<attr>/<name>")."""
        self.folder = folder
        self.accelerator = accelerator
        self.every = every
        self.keep = keep
        self.reporter = reporter
        self.record = {"parameters": parameters, "data_fingerprint": data_fingerprint,
                       **processes_record(accelerator.num_processes, parameters["train_batch_size"],
                                          parameters["gradient_accumulation_steps"])}
        self.state = RunState(seed=parameters["seed"])
        self.lora = {name: p for name, p in denoiser.named_parameters() if p.requires_grad}
        for attr, module in (text_encoders or {}).items():
            self.lora.update({f"{attr}/{name}": p for name, p in module.named_parameters() if p.requires_grad})
        accelerator.register_save_state_pre_hook(self._save_lora)
        accelerator.register_load_state_pre_hook(self._load_lora)
        accelerator.register_for_checkpointing(*([ema] if ema is not None else []), self.state)

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def due(self, step: int) -> bool:
        return self.enabled and step % self.every == 0

    # --- accelerate hooks: only the LoRA weights, as safetensors --------------------------
    def _save_lora(self, models: list, weights: list, output_dir: str) -> None:
        if self.accelerator.is_main_process:
            save_file({k: v.detach().contiguous() for k, v in self.lora.items()}, os.path.join(output_dir, LORA_NAME))
        weights.clear()  # not the whole denoiser

    def _load_lora(self, models: list, input_dir: str) -> None:
        saved = load_file(os.path.join(input_dir, LORA_NAME))
        if saved.keys() != self.lora.keys():
            raise InputError(f"resume_from_checkpoint: {input_dir} holds LoRA weights for other layers.")
        with torch.no_grad():
            for name, param in self.lora.items():
                param.copy_(saved[name])
        models.clear()

    # --- save -------------------------------------------------------------------------------
    def save(self, step: int, epoch: int, batches_done: int) -> Path | None:
        """Write checkpoint-<step>; on a failed write (a full disk) warn, keep training and the
        checkpoints already written. Every process passes the same barriers, whatever fails."""
        acc = self.accelerator
        self.state.step, self.state.epoch, self.state.batches_done = step, epoch, batches_done
        target = self.folder / f"{PREFIX}{step}"
        staging = self.folder / f".{target.name}.partial-0"  # one name for all processes
        error: Exception | None = None  # not only OSError: safetensors raises its own error on a full disk
        try:
            if acc.is_main_process:
                atomic.staging_dir(target, tag="0")
        except Exception as exc:
            error = exc
        acc.wait_for_everyone()
        try:
            if error is None:
                acc.save_state(str(staging))
        except Exception as exc:
            error = exc
        acc.wait_for_everyone()
        try:
            if error is None and acc.is_main_process:
                (staging / PARAMETERS_NAME).write_text(json.dumps({**self.record, "step": step}, indent=1, default=str))
                if os.environ.get(TEST_SLEEP_ENV):
                    time.sleep(float(os.environ[TEST_SLEEP_ENV]))
                atomic.commit(staging, target)
                self._prune()
        except Exception as exc:
            error = exc
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return None
        if error is not None:
            shutil.rmtree(staging, ignore_errors=True)
            kept = existing(self.folder)
            self.reporter.warn(f"Could not write the checkpoint at step {step} in {self.folder} ({error}); training "
                               f"on. {'The last good one is ' + str(kept[-1]) if kept else 'No checkpoint is kept'}.")
            return None
        self.reporter.save_checkpoint(target, target.name, self.keep)
        return target

    def _prune(self) -> None:
        found = existing(self.folder)
        if self.keep and len(found) > self.keep:
            for old in found[:len(found) - self.keep]:
                atomic.remove_folder(old)

    # --- load -------------------------------------------------------------------------------
    def load(self, path: Path) -> RunState:
        self.accelerator.load_state(str(path))
        return self.state
