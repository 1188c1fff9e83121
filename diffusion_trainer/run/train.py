"""One training run, start to finish, assembled from its parts: check inputs, load, train, save,
evaluate (setting each part up is in setup.py).

Cheap checks (model family, resolution, dataset and its columns) come before any weights
are loaded, and nothing is written until they pass.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


from .. import atomic
from ..data.check import check_dataset
from ..data.sources import load_records
from ..errors import InputError, raise_if_stopped
from ..families import family_for
from ..lora import LoraEMA, attach_lora, lora_metadata
from ..outputs import adapter, guards
from ..outputs.layout import INFO_NAME, RunPaths
from ..params import TrainingParams
from . import checkpoint, loop, optimizers, processes, setup, steps, trace
from .evaluate import EvalSettings, Evaluator


@dataclass
class RunResult:
    status: str  # "completed" or "stopped"
    paths: RunPaths
    steps: int
    epochs: int
    final_loss: float | None
    losses: list[tuple[int, float]]
    eval_images: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    timing: dict[str, float] = field(default_factory=dict)  # loop timestamps, for the benchmark
    stop_reason: str | None = None  # why a stopped run stopped (reporting.INTERRUPT, TERMINATE, LAB_STOP)


def run_training(params: TrainingParams, paths: RunPaths, reporter: Any) -> RunResult:
    """Check what the run would write over, hold the output folder's lock, train."""
    dataset_dir = local_dataset_folder(params.dataset_name)
    guards.check_adapter_target(paths.adapter_dir, INFO_NAME, dataset_dir,
                                [paths.logs_dir, paths.eval_images_dir, paths.checkpoints_dir, paths.cache_dir])
    lock = guards.OutputLock(paths.adapter_dir.parent, paths.adapter_dir.name)
    try:
        return train_with_lock(lock, params, paths, reporter)
    finally:
        lock.release()


def planned_settings(params: TrainingParams, reporter: Any) -> TrainingParams:
    """Print the memory plan first; with a GPU budget, train with the settings it chose. Explicit
    settings that cannot fit stop the run here (DoesNotFit, an InputError: exit 2), before anything loads."""
    from ..memory.plan import DoesNotFit, plan_for

    try:
        plan = plan_for(params)
    except DoesNotFit:
        raise
    except Exception as exc:  # a config the meta-device count cannot read or build: the run goes on as before
        reporter.info(f"Memory plan: not made ({type(exc).__name__}: {exc}).")
        return params
    for line in plan.lines():
        reporter.info(line)
    if plan.budget_gb is None:
        return params
    chosen = plan.settings
    return params.model_copy(update={"base_precision": chosen.base_precision, "offload": chosen.offload,
                                     "gradient_checkpointing": chosen.gradient_checkpointing})


def local_dataset_folder(dataset_name: str) -> Path | None:
    path = Path(dataset_name).expanduser()
    return path if path.is_dir() else None


def train_with_lock(lock: guards.OutputLock, params: TrainingParams, paths: RunPaths, reporter: Any) -> RunResult:
    """The run; `lock` is taken once the cheap checks pass, before the first write."""
    started = time.monotonic()
    from accelerate.utils import set_seed

    # --- cheap checks first: nothing is loaded or written until these pass ---------------
    family_cls = family_for(params.model_name)
    if params.resolution % family_cls.resolution_multiple:
        raise InputError(f"resolution: {family_cls.label} needs a multiple of "
                         f"{family_cls.resolution_multiple} (got {params.resolution}).")
    params = planned_settings(params, reporter)
    load_problems: list[str] = []
    load_notes: list[str] = []
    records = load_records(params.dataset_name, params.image_column, params.caption_column, load_problems,
                           params.allow_files_outside_dataset, paths.written(),
                           caption_extension=params.caption_extension, default_caption=params.default_caption,
                           trigger_word=params.trigger_word, notes=load_notes)
    for note in load_notes:
        reporter.info(note)
    checked = check_dataset(records, image_column=params.image_column, caption_column=params.caption_column,
                            dataset_name=params.dataset_name, skip_bad_images=params.skip_bad_images,
                            resolution=params.resolution, bucketing=params.aspect_ratio_bucketing,
                            load_problems=load_problems, reporter=reporter)
    records = checked.records
    runtime = setup.decide_runtime(params, reporter)
    optimizers.check_optimizer(params, reporter)
    if params.lr_scheduler == "constant" and params.lr_warmup_steps:
        reporter.info(f"lr_warmup_steps={params.lr_warmup_steps} is not used by lr_scheduler=constant "
                      "(choose constant_with_warmup for a warmup).")
    checkpoints_dir = paths.checkpoints_dir
    if processes.is_main_process():
        lock.acquire()
    # what earlier runs left, and which checkpoint to resume: decided by the main process alone
    # (shared below), so no two processes rename the same folder or resume different checkpoints
    for note in tidy_outputs(paths, checkpoints_dir) if processes.is_main_process() else []:
        reporter.info(note)
    setup.check_output_folders(paths, checkpoints_dir, params)
    resume_from, resume_notes = (choose_checkpoint(params, checkpoints_dir, reporter)
                                 if processes.is_main_process() else (None, []))
    if resume_from is not None:
        for note in checkpoint.compatibility_notes(resume_from, params.model_dump(), checked.fingerprint,
                                                   processes.num_processes()):
            reporter.info(f"Resuming with a changed setting (allowed): {note}")

    # --- model -----------------------------------------------------------------------------
    accelerator = setup.make_accelerator(params, runtime, paths, reporter)
    processes.refuse_unsupported(accelerator)
    resume_from, resume_notes = processes.decided_on_main(accelerator, (resume_from, resume_notes))
    with accelerator.local_main_process_first():  # another machine: its first process copies the Lab's
        if resume_from is not None and not resume_from.exists():
            resume_from = reporter.checkpoint_to_resume() or resume_from
    set_seed(params.seed)
    family = setup.load_family(family_cls, params, runtime, accelerator, reporter)
    raise_if_stopped(reporter.stop_asked_here, "while the model loaded")
    prediction_type = setup.choose_prediction_type(params, family, reporter)
    family.configure_objective(params, prediction_type)
    for note in family.inapplicable_notes(params):
        reporter.info(note)
    denoiser = family.denoiser
    trainable = attach_lora(denoiser, params.lora_r, params.lora_alpha, family.lora_targets(params.lora_layers))
    setup.speed_up_denoiser(denoiser, params, runtime, reporter)

    # --- data: encode once where we can, then park the encoders --------------------------
    samples, inputs = setup.prepare_data(family, records, checked.images_fingerprint, params, paths.cache_dir, accelerator,
                                   reporter)
    dataloader = setup.make_dataloader(samples, params, accelerator)

    # --- optimizer: steps are global optimizer steps, whatever the number of processes ------------
    planned = steps.plan_steps(len(dataloader), params.gradient_accumulation_steps, params.num_train_epochs,
                                     params.max_train_steps)
    optimizer, lr_scheduler = setup.make_optimizer(trainable, params, planned.total_steps, accelerator)
    max_grad_norm, clipping_note = processes.loop_clipping(accelerator, params.max_grad_norm)
    if clipping_note:
        reporter.warn(clipping_note)
    prepared, optimizer, dataloader, lr_scheduler = accelerator.prepare(denoiser, optimizer, dataloader, lr_scheduler)
    prepared_plan = steps.plan_steps(len(dataloader), accelerator.gradient_accumulation_steps,
                                   params.num_train_epochs, params.max_train_steps)
    if prepared_plan != planned:  # e.g. a DeepSpeed config's own gradient accumulation (diffusers warns alike)
        reporter.warn(f"The prepared data makes {prepared_plan.total_steps} optimizer steps, not the {planned.total_steps} "
                      "the learning-rate schedule was built for.")
    total_steps, num_epochs = prepared_plan.total_steps, prepared_plan.num_epochs
    if params.max_train_steps and num_epochs != params.num_train_epochs:
        reporter.info(f"max_train_steps={params.max_train_steps} overrides num_train_epochs="
                      f"{params.num_train_epochs}: training {num_epochs} epochs of {prepared_plan.updates_per_epoch} steps.")
    accumulation = steps.clamp_accumulation(accelerator, len(dataloader), reporter)
    dataloader = trace.traced(dataloader, samples, optimizer, accelerator.process_index)
    processes.seed_this_process(params.seed, accelerator.process_index)
    ema = LoraEMA(trainable, params.ema_decay) if params.use_ema else None
    run_folder = checkpoints_dir if paths.own_checkpoints_dir else processes.same_on_every_process(
        accelerator, lambda: checkpoint.run_folder_for(resume_from, checkpoints_dir))
    checkpoints = checkpoint.Checkpoints(run_folder, accelerator, denoiser, ema, every=params.checkpointing_steps,
                                         keep=params.checkpoints_total_limit, parameters=params.model_dump(),
                                         data_fingerprint=checked.fingerprint, reporter=reporter)
    setup.check_room(paths, trainable, params, reporter)

    # --- outputs -----------------------------------------------------------------------------
    wandb_kwargs = {"name": params.adaptor_name, "dir": str(paths.logs_dir)}
    if os.environ.get("WANDB_MODE"):
        wandb_kwargs["mode"] = os.environ["WANDB_MODE"].lower()  # not whatever an earlier import fixed
    accelerator.init_trackers("diffusion_trainer", config=setup.tracker_config(params), init_kwargs={"wandb": wandb_kwargs})
    settings = EvalSettings(params.eval_prompt, params.seed, params.eval_steps, params.eval_num_inference_steps,
                            params.eval_guidance_scale, params.resolution)
    evaluator = Evaluator(family, settings, paths.eval_images_dir if params.eval_prompt.strip() else None,
                          accelerator, ema, reporter.stop_asked_here)
    if evaluator.enabled and accelerator.is_main_process:
        paths.eval_images_dir.mkdir(parents=True, exist_ok=True)
    reporter.record_outputs(eval_images_dir=evaluator.out_dir, tensorboard_dir=paths.logs_dir)
    several = f" x {accelerator.num_processes} processes" if accelerator.num_processes > 1 else ""
    reporter.info(f"Training {len(samples)} images for {total_steps} optimizer steps ({num_epochs} epochs, "
                  f"batch {params.train_batch_size}{several} x {accumulation} accumulation).")

    start = None
    if resume_from is not None:  # last of all: it restores the RNG states the setup above drew on
        start = checkpoints.load(resume_from)
        reporter.info(f"Resuming from {resume_from}: step {start.step} of {total_steps}, epoch {start.epoch} "
                      f"({start.batches_done} of its {len(dataloader)} batches already trained).")
        for note in resume_notes:
            reporter.warn(note)
        for before, now in checkpoint.continue_schedule(lr_scheduler)[:1]:
            if before != now:
                reporter.info(f"The learning-rate schedule follows this run's {total_steps} steps from step "
                              f"{start.step + 1} on: learning rate {now:.4g} (the checkpoint's schedule had {before:.4g}).")
    if not reporter.stop_requested():  # before.png, the base model's image (a resume keeps its first run's)
        evaluator.before(resumed=start is not None)
    outcome = loop.run(loop.Training(
        accelerator=accelerator, family=family, denoiser=prepared, trainable=trainable,
        optimizer=optimizer, lr_scheduler=lr_scheduler, dataloader=dataloader, samples=samples,
        inputs=inputs, evaluator=evaluator, reporter=reporter, ema=ema, loss_type=params.loss_type,
        huber_c=params.huber_c, max_grad_norm=max_grad_norm, num_epochs=num_epochs,
        total_steps=total_steps, start=start, checkpoints=checkpoints))

    # --- the adapter first (a stop has seconds left), then the last checkpoint, then the final eval image ---
    accelerator.wait_for_everyone()
    saved_to, failure = paths.adapter_dir, None
    if accelerator.is_main_process:
        try:
            info = adapter_info(family, params, outcome, prediction_type)
            kept = checkpoint.existing(run_folder)
            saved_to = adapter.save_somewhere(
                lambda folder: adapter.save_adapter(folder, family, params.adaptor_name, info, ema, samples.captions),
                paths.adapter_dir, params.adaptor_name, outcome.steps, outcome.stopped, kept[-1] if kept else None,
                reporter)
        except adapter.RunFailed as exc:  # the weights went to a rescue folder (or nowhere): still try the checkpoint
            failure = exc
        if failure is None:
            reporter.adapter_saved(saved_to, params.adaptor_name)
    if checkpoints.enabled and outcome.steps > max(start.step if start else 0, outcome.checkpointed_step):
        checkpoints.save(outcome.steps, outcome.epochs, outcome.position)
    if failure is not None:
        raise failure
    # asked after the saves (a stop may come meanwhile) by every process: with several, a collective
    stopping = outcome.stopped or reporter.stop_requested()
    if accelerator.is_main_process and not stopping:  # a stop may have seconds left: no extra image
        evaluator.run("final", outcome.steps)
    accelerator.end_training()
    return RunResult("stopped" if stopping else "completed", replace(paths, adapter_dir=saved_to), outcome.steps,
                     outcome.epochs, outcome.final_loss, outcome.losses, evaluator.images, time.monotonic() - started,
                     outcome.timing)


def tidy_outputs(paths: RunPaths, checkpoints_dir: Path) -> list[str]:
    """Sort out what killed writes of an earlier run left: the adapter's and checkpoints' temporary
    folders (a complete one is put in place)."""
    notes = atomic.recover_leftovers(paths.adapter_dir.parent, only=paths.adapter_dir.name)
    for folder in dict.fromkeys([checkpoints_dir, *checkpoint.run_folders(checkpoints_dir)]):
        notes += atomic.recover_leftovers(folder)
    return notes


def choose_checkpoint(params: TrainingParams, checkpoints_dir: Path, reporter: Any) -> tuple[Path | None, list[str]]:
    """resume_from_checkpoint, or else the checkpoint a launcher (the Lab's resume) hands us, with
    notes on it (a missing RNG state)."""
    if params.resume_from_checkpoint.strip():
        return checkpoint.resolve(params.resume_from_checkpoint, checkpoints_dir, reporter)
    handed = reporter.checkpoint_to_resume()
    if handed is not None:
        reporter.info(f"The Lab asks to resume from checkpoint {handed}.")
        return checkpoint.resolve(str(handed), checkpoints_dir, reporter)
    return None, []


def adapter_info(family: Any, params: TrainingParams, outcome: loop.Outcome, prediction_type: str | None) -> dict:
    """The adapter's info file: what it is, for which model, and how it was trained."""
    return adapter.adaptor_info(
        architecture=family.pipeline_class.__name__, base_model=params.model_name, rank=params.lora_r,
        alpha=params.lora_alpha, target_modules=list(lora_metadata(family.denoiser)["target_modules"]),
        trigger_word=params.trigger_word, parameters=params.model_dump(), steps_trained=outcome.steps,
        epochs_trained=outcome.epochs, final_loss=outcome.final_loss, prediction_type=prediction_type,
        stopped_early=outcome.stopped)
