"""One training run, start to finish: check inputs, load, train, save, evaluate.

Cheap checks (model family, resolution, dataset and its columns) come before any weights
are loaded, and nothing is written until they pass.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import atomic, checkpoint, distributed, loop, optimizers
from .data.batch import ModelInputs
from .data.buckets import BucketBatchSampler
from .data.cache import CachedSamples, DiskLatents, TextCache, build_latent_cache
from .data.check import check_dataset, long_captions
from .data.images import Augmentation
from .data.samples import build_samples
from .data.sources import load_records
from .errors import InputError, raise_if_stopped
from .evaluate import Evaluator
from .families import family_for
from .lora import LoraEMA, attach_lora, lora_metadata
from .outputs import adapter, guards
from .outputs.layout import INFO_NAME, RunPaths
from .params import TrainingParams
from .reporting import ignore_stop_signals

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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


@dataclass(frozen=True)
class Runtime:
    """Decisions about this machine, made once from the parameters."""

    mixed_precision: str
    use_xformers: bool


def decide_runtime(params: TrainingParams, reporter: Any) -> Runtime:
    cuda = torch.cuda.is_available()
    if cuda and torch.cuda.get_device_capability()[0] >= 8:
        torch.backends.cuda.matmul.allow_tf32 = True  # Ampere and later: TF32 matmuls, fp32 storage
        torch.backends.cudnn.allow_tf32 = True
    precision = params.mixed_precision
    if precision == "fp16" and not cuda:
        reporter.warn("mixed_precision=fp16 needs a CUDA GPU; training in fp32 on this machine.")
        precision = "no"
    xformers = params.enable_xformers_memory_efficient_attention
    if xformers and not cuda:
        reporter.warn("enable_xformers_memory_efficient_attention needs a CUDA GPU; using PyTorch's "
                      "SDPA attention instead.")
        xformers = False
    return Runtime(precision, xformers)


def choose_prediction_type(params: TrainingParams, family: Any, reporter: Any) -> str | None:
    """The model's own prediction type unless the run asks for another (then say so loudly)."""
    own = family.model_prediction_type()
    if own is None:
        return None
    if params.prediction_type == "auto":
        return own
    if params.prediction_type != own:
        reporter.warn(
            f"{'!' * 70}\n  prediction_type={params.prediction_type} but this base model was trained "
            f"with {own}.\n  Training as asked: the adapter will only work with a scheduler set to "
            f"{params.prediction_type}.\n  Set prediction_type to auto (or {own}) to keep the "
            f"model's own.\n{'!' * 70}")
    return params.prediction_type


def make_accelerator(params: TrainingParams, runtime: Runtime, paths: RunPaths, reporter: Any):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    # Accelerate keeps one state per process; a new run may need another precision.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    trackers = ["tensorboard"]
    if params.log_to_wandb:
        ready, reason = wandb_ready()
        if ready:
            trackers.append("wandb")
        elif reason:
            reporter.warn(f"log_to_wandb is on but {reason}; logging to TensorBoard only.")
    return Accelerator(
        mixed_precision=runtime.mixed_precision,
        gradient_accumulation_steps=params.gradient_accumulation_steps,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(paths.logs_dir), logging_dir=str(paths.logs_dir)),
        **distributed.accelerator_kwargs(),
    )


def wandb_ready() -> tuple[bool, str]:
    """(usable, why not). Offline mode needs no account; no key and no offline mode: skip."""
    if importlib.util.find_spec("wandb") is None:
        return False, "the wandb package is not installed"
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode == "disabled":
        return False, ""
    if mode in {"offline", "dryrun"} or os.environ.get("WANDB_API_KEY"):
        return True, ""
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return True, ""
    return False, "W&B is not configured (no WANDB_API_KEY, no `wandb login`, WANDB_MODE is not offline)"


def tracker_config(params: TrainingParams) -> dict[str, Any]:
    return {k: v for k, v in params.model_dump().items() if isinstance(v, (int, float, str, bool))}


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
    load_problems: list[str] = []
    records = load_records(params.dataset_name, params.image_column, params.caption_column, load_problems,
                           params.allow_files_outside_dataset, paths.written())
    checked = check_dataset(records, image_column=params.image_column, caption_column=params.caption_column,
                            dataset_name=params.dataset_name, skip_bad_images=params.skip_bad_images,
                            resolution=params.resolution, bucketing=params.aspect_ratio_bucketing,
                            load_problems=load_problems, reporter=reporter)
    records = checked.records
    runtime = decide_runtime(params, reporter)
    optimizers.check_optimizer(params, reporter)
    if params.lr_scheduler == "constant" and params.lr_warmup_steps:
        reporter.info(f"lr_warmup_steps={params.lr_warmup_steps} is not used by lr_scheduler=constant "
                      "(choose constant_with_warmup for a warmup).")
    checkpoints_dir = paths.checkpoints_dir
    if distributed.is_main_process():
        lock.acquire()
    # what earlier runs left, and which checkpoint to resume: decided by the main process alone
    # (shared below), so no two processes rename the same folder or resume different checkpoints
    for note in tidy_outputs(paths, checkpoints_dir) if distributed.is_main_process() else []:
        reporter.info(note)
    check_output_folders(paths, checkpoints_dir, params)
    resume_from, resume_notes = (choose_checkpoint(params, checkpoints_dir, reporter)
                                 if distributed.is_main_process() else (None, []))
    if resume_from is not None:
        for note in checkpoint.compatibility_notes(resume_from, params, checked.fingerprint,
                                                   distributed.num_processes()):
            reporter.info(f"Resuming with a changed setting (allowed): {note}")

    # --- model -----------------------------------------------------------------------------
    accelerator = make_accelerator(params, runtime, paths, reporter)
    distributed.refuse_unsupported(accelerator)
    resume_from, resume_notes = distributed.decided_on_main(accelerator, (resume_from, resume_notes))
    with accelerator.local_main_process_first():  # another machine: its first process copies the Lab's
        if resume_from is not None and not resume_from.exists():
            resume_from = reporter.checkpoint_to_resume() or resume_from
    set_seed(params.seed)
    family = load_family(family_cls, params, runtime, accelerator, reporter)
    raise_if_stopped(reporter.stop_asked_here, "while the model loaded")
    prediction_type = choose_prediction_type(params, family, reporter)
    family.configure_objective(params, prediction_type)
    for note in family.inapplicable_notes(params):
        reporter.info(note)
    denoiser = family.denoiser
    trainable = attach_lora(denoiser, params.lora_r, params.lora_alpha, family.lora_targets(params.lora_layers))
    speed_up_denoiser(denoiser, params, runtime, reporter)

    # --- data: encode once where we can, then park the encoders --------------------------
    samples, inputs = prepare_data(family, records, checked.images_fingerprint, params, paths.cache_dir, accelerator,
                                   reporter)
    dataloader = make_dataloader(samples, params, accelerator)

    # --- optimizer: steps are global optimizer steps, whatever the number of processes ------------
    planned = distributed.plan_steps(len(dataloader), params.gradient_accumulation_steps, params.num_train_epochs,
                                     params.max_train_steps)
    optimizer, lr_scheduler = make_optimizer(trainable, params, planned.total_steps, accelerator)
    max_grad_norm, clipping_note = distributed.loop_clipping(accelerator, params.max_grad_norm)
    if clipping_note:
        reporter.warn(clipping_note)
    prepared, optimizer, dataloader, lr_scheduler = accelerator.prepare(denoiser, optimizer, dataloader, lr_scheduler)
    steps = distributed.plan_steps(len(dataloader), accelerator.gradient_accumulation_steps,
                                   params.num_train_epochs, params.max_train_steps)
    if steps != planned:  # e.g. a DeepSpeed config's own gradient accumulation (diffusers warns alike)
        reporter.warn(f"The prepared data makes {steps.total_steps} optimizer steps, not the {planned.total_steps} "
                      "the learning-rate schedule was built for.")
    total_steps, num_epochs = steps.total_steps, steps.num_epochs
    if params.max_train_steps and num_epochs != params.num_train_epochs:
        reporter.info(f"max_train_steps={params.max_train_steps} overrides num_train_epochs="
                      f"{params.num_train_epochs}: training {num_epochs} epochs of {steps.updates_per_epoch} steps.")
    accumulation = clamp_accumulation(accelerator, len(dataloader), reporter)
    dataloader = distributed.traced(dataloader, samples, optimizer, accelerator.process_index)
    distributed.seed_this_process(params.seed, accelerator.process_index)
    ema = LoraEMA(trainable, params.ema_decay) if params.use_ema else None
    run_folder = checkpoints_dir if paths.own_checkpoints_dir else distributed.same_on_every_process(
        accelerator, lambda: checkpoint.run_folder_for(resume_from, checkpoints_dir))
    checkpoints = checkpoint.Checkpoints(run_folder, accelerator, denoiser, ema, params, checked.fingerprint,
                                         reporter)
    check_room(paths, trainable, params, reporter)

    # --- outputs -----------------------------------------------------------------------------
    wandb_kwargs = {"name": params.adaptor_name, "dir": str(paths.logs_dir)}
    if os.environ.get("WANDB_MODE"):
        wandb_kwargs["mode"] = os.environ["WANDB_MODE"].lower()  # not whatever an earlier import fixed
    accelerator.init_trackers("diffusion_trainer", config=tracker_config(params), init_kwargs={"wandb": wandb_kwargs})
    evaluator = Evaluator(family, params, paths.eval_images_dir if params.eval_prompt.strip() else None,
                          accelerator, ema, reporter.stop_asked_here)
    if evaluator.enabled and accelerator.is_main_process:
        paths.eval_images_dir.mkdir(parents=True, exist_ok=True)
    reporter.record_outputs(eval_images_dir=evaluator.out_dir, tensorboard_dir=paths.logs_dir)
    processes = f" x {accelerator.num_processes} processes" if accelerator.num_processes > 1 else ""
    reporter.info(f"Training {len(samples)} images for {total_steps} optimizer steps ({num_epochs} epochs, "
                  f"batch {params.train_batch_size}{processes} x {accumulation} accumulation).")

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


def check_output_folders(paths: RunPaths, checkpoints_dir: Path, params: TrainingParams) -> None:
    """Every folder the run writes to can be created and written, before anything loads."""
    import tempfile

    folders = [("output_dir (adapter)", paths.adapter_dir.parent), ("output_dir (logs)", paths.logs_dir)]
    if params.checkpointing_steps or params.resume_from_checkpoint.strip():
        folders.append(("output_dir (checkpoints)", checkpoints_dir))
    for name, folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as exc:
            raise InputError(f"{name}: cannot write in '{folder}' ({exc.strerror or exc}).") from None


def check_room(paths: RunPaths, trainable: list[torch.nn.Parameter], params: TrainingParams, reporter: Any) -> None:
    """Room on disk for the adapter and a checkpoint (weights, two Adam moments, EMA) with a margin;
    refuse when there is not even room for the adapter, warn when checkpoints may not fit."""
    import shutil

    weights = sum(p.numel() * 4 for p in trainable)
    adapter_bytes, checkpoint_bytes = 2 * weights, 5 * weights  # x2: a new adapter beside the old one
    free = shutil.disk_usage(paths.adapter_dir.parent).free
    mb = 2**20
    if free < adapter_bytes:
        raise InputError(f"output_dir: {free / mb:.1f} MB free at '{paths.adapter_dir.parent}', the adapter "
                         f"needs about {adapter_bytes / mb:.1f} MB.")
    if params.checkpointing_steps and free < adapter_bytes + checkpoint_bytes * max(1, params.checkpoints_total_limit):
        reporter.warn(f"Only {free / mb:.1f} MB free at '{paths.adapter_dir.parent}': the adapter needs about "
                      f"{adapter_bytes / mb:.1f} MB and each checkpoint about {checkpoint_bytes / mb:.1f} MB.")


def load_family(family_cls: Any, params: TrainingParams, runtime: Runtime, accelerator: Any, reporter: Any):
    weight_dtype = WEIGHT_DTYPES[runtime.mixed_precision]
    reporter.info(f"Loading {family_cls.label} from {params.model_name} "
                  f"(base weights {str(weight_dtype).removeprefix('torch.')}) on {accelerator.device}.")
    family = family_cls.load(params.model_name, weight_dtype)
    family.pipeline.to(accelerator.device)
    for module in family.frozen_modules:
        module.requires_grad_(False)
    return family


def speed_up_denoiser(denoiser: torch.nn.Module, params: TrainingParams, runtime: Runtime, reporter: Any) -> None:
    if params.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if runtime.use_xformers:
        try:
            denoiser.enable_xformers_memory_efficient_attention()
        except Exception as exc:  # not installed, or built for another torch/CUDA
            reporter.warn(f"xFormers could not be enabled ({exc}); using PyTorch's SDPA attention.")
    if params.torch_compile:
        denoiser.compile()  # in place: the module (and its LoRA weights) stay the ones we save


def prepare_data(family: Any, records: Any, images_fingerprint: str, params: TrainingParams, cache_dir: Path,
                 accelerator: Any, reporter: Any) -> tuple[Any, ModelInputs]:
    """The training dataset and how batches become model inputs: cached latents and text
    embeddings when asked for, after which the VAE and text encoders leave the accelerator
    (or are freed when no eval image will need them)."""
    samples = training_samples(records, params)
    for note in long_captions(family.pipeline, samples.captions):
        reporter.warn(note)
    if params.aspect_ratio_bucketing:
        shapes = sorted(set(samples.targets))
        reporter.info(f"Aspect-ratio buckets in use (height x width): {', '.join(f'{h}x{w}' for h, w in shapes)}.")
    keep_for_eval = bool(params.eval_prompt.strip())
    text_cache = None
    if params.cache_text_embeddings:
        text_cache = TextCache(family, samples.captions, accelerator.device, stop_asked=reporter.stop_asked_here)
        parked = family.park(family.text_encoder_attrs, keep_for_eval)
        reporter.info(f"Text cache: {len(text_cache)} distinct captions ({text_cache.size_mb:.1f} MB); "
                      f"{', '.join(parked)} {'moved off the accelerator' if keep_for_eval else 'freed'}.")
    if params.cache_latents:
        store = build_latent_cache(family, samples, model_name=params.model_name, variants=params.latent_cache_variants,
                                   memory_budget_mb=params.cache_memory_budget_mb,
                                   bucketing=params.aspect_ratio_bucketing, images=images_fingerprint,
                                   cache_root=cache_dir, reporter=reporter,
                                   writer_first=accelerator.local_main_process_first)
        samples = CachedSamples(store, samples)
        family.park(("vae",), keep_for_eval)
    else:
        reporter.info("cache_latents is off: the VAE encodes every batch (augmented afresh each time).")
    return samples, ModelInputs(family, params.caption_dropout_rate, accelerator.device, text_cache)


def training_samples(records: Any, params: TrainingParams) -> Any:
    return build_samples(records, params.image_column, params.caption_column, params.trigger_word,
                         Augmentation.of(params), params.seed, params.aspect_ratio_bucketing)


def make_dataloader(samples: Any, params: TrainingParams, accelerator: Any):
    cuda = accelerator.device.type == "cuda"
    batches = math.ceil(len(samples) / params.train_batch_size)
    # Workers pay off only when items are expensive (decoding, augmenting, reading disk) and an
    # epoch is long enough to amortise starting them; cached latents in memory are neither.
    expensive = not isinstance(samples, CachedSamples) or isinstance(samples.store, DiskLatents)
    workers = min(4, (os.cpu_count() or 1) - 1) if expensive and batches >= 8 else 0
    options: dict[str, Any] = {"num_workers": max(0, workers), "pin_memory": cuda}
    if options["num_workers"]:
        options["worker_init_fn"] = ignore_stop_signals
    # The order comes from (seed, epoch) alone; the loader's own generator (worker seeds only: the
    # transforms are seeded per sample) keeps it from drawing on the global RNG each epoch.
    sampler = BucketBatchSampler(samples, params.train_batch_size, params.seed, accelerator.num_processes,
                                 accelerator.process_index)
    loader = torch.utils.data.DataLoader(samples, batch_sampler=sampler, generator=torch.Generator().manual_seed(params.seed),
                                         **options)
    return distributed.already_sharded(loader, accelerator)


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


def make_optimizer(trainable: list[torch.nn.Parameter], params: TrainingParams, total_steps: int, accelerator: Any):
    from diffusers.optimization import get_scheduler

    optimizer = optimizers.make_optimizer(trainable, params, accelerator.device)
    lr_scheduler = get_scheduler(params.lr_scheduler, optimizer,
                                 num_warmup_steps=params.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=total_steps * accelerator.num_processes)
    return optimizer, lr_scheduler


def adapter_info(family: Any, params: TrainingParams, outcome: loop.Outcome, prediction_type: str | None) -> dict:
    """The adapter's info file: what it is, for which model, and how it was trained."""
    return adapter.adaptor_info(
        architecture=family.pipeline_class.__name__, base_model=params.model_name, rank=params.lora_r,
        alpha=params.lora_alpha, target_modules=list(lora_metadata(family.denoiser)["target_modules"]),
        trigger_word=params.trigger_word, parameters=params.model_dump(), steps_trained=outcome.steps,
        epochs_trained=outcome.epochs, final_loss=outcome.final_loss, prediction_type=prediction_type,
        stopped_early=outcome.stopped)
