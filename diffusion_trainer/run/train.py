"""One training run, start to finish, assembled from its parts: check inputs, load, train, save,
evaluate (setting each part up is in setup.py).

Cheap checks (model family, resolution, dataset and its columns) come before any weights
are loaded, and nothing is written until they pass.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from .. import atomic
from ..data import prior
from ..data.check import CheckedData, check_dataset
from ..data.sources import load_records
from ..errors import InputError, raise_if_stopped
from ..families import FAMILIES, family_for
from ..lora import TEXT_ENCODER_LAYERS, Adapter, AdapterSpec, LoraEMA
from ..memory import storage
from ..outputs import adapter, guards
from ..outputs.layout import INFO_NAME, RunPaths
from ..outputs.metrics import run_metrics, write_metrics
from ..params import TrainingParams
from . import checkpoint, loop, optimizers, processes, setup, steps, trace
from .class_images import DrawSettings, generate_class_images
from .evaluate import METRICS_NAME, EvalSettings, Evaluator, parse_prompts, record_eval_prompts
from .validation import Validation, split_rows


def trained_pipeline_classes() -> list[str]:
    """The pipeline class names this trainer takes (the Lab's `model_architectures` filter)."""
    return list(FAMILIES)


@dataclass
class RunResult:
    status: str  # "completed" or "stopped"
    paths: RunPaths
    steps: int
    epochs: int
    final_loss: float | None
    losses: list[tuple[int, float]]
    eval_images: list[Path] = field(default_factory=list)  # one grid per eval
    validation: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # (step, val/loss…) per eval
    extra_grids: list[Path] = field(default_factory=list)  # the eval grids without EMA
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


def planned_settings(params: TrainingParams, reporter: Any) -> tuple[TrainingParams, tuple[str, ...]]:
    """Print the memory plan first; with a GPU budget, train with the settings it chose (and the text
    encoders it stores in int8). Explicit settings that cannot fit stop the run here (DoesNotFit, an
    InputError: exit 2), before anything loads."""
    from ..memory.plan import DoesNotFit, host_ram_total_gb, plan_for

    if params.offload == "blocks" and not params.gradient_checkpointing:
        reporter.info("offload=blocks turns gradient_checkpointing on: without it autograd keeps every block's "
                      "weights on the accelerator for the backward pass.")
        params = params.model_copy(update={"gradient_checkpointing": True})
    try:
        host = host_ram_total_gb()  # shared by the launcher's processes on this machine, each loading the model
        plan = plan_for(params, host_budget_gb=host / processes.processes_on_this_machine() if host else None)
    except DoesNotFit:
        raise
    except Exception as exc:  # a config the meta-device count cannot read or build: the run goes on as before
        reporter.info(f"Memory plan: not made ({type(exc).__name__}: {exc}).")
        return params, ()
    for line in plan.lines():
        reporter.info(line)
    if plan.budget_gb is None:
        return params, ()
    for name, bits in plan.quantized_text_encoders.items():
        storage.check_storage(bits, what=f"the memory plan's {bits} {name}")
    chosen = plan.settings
    return params.model_copy(update={"base_precision": chosen.base_precision, "offload": chosen.offload,
                                     "gradient_checkpointing": chosen.gradient_checkpointing}), plan.quantized_text_encoders


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
    params, quantized_text = planned_settings(params, reporter)
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
                            load_problems=load_problems, reporter=reporter, masked_loss=params.masked_loss)
    records, held_out, images_fingerprint, masks = hold_out(checked, params.validation_split, reporter)
    class_plan = plan_class_images(params, paths, reporter)
    # the images already there are checked now (drawn ones are read once drawn)
    class_checked = (read_class_data(params, class_plan, paths, reporter)
                     if class_plan and (class_plan.existing or not class_plan.missing) else None)
    data_fingerprint = combined_fingerprint(checked, class_checked)
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
        for note in checkpoint.compatibility_notes(resume_from, params.model_dump(), data_fingerprint,
                                                   processes.num_processes()):
            reporter.info(f"Resuming with a changed setting (allowed): {note}")

    # --- model -----------------------------------------------------------------------------
    accelerator = setup.make_accelerator(params, runtime, paths, reporter)
    processes.refuse_unsupported(accelerator, params.train_text_encoder)
    resume_from, resume_notes = processes.decided_on_main(accelerator, (resume_from, resume_notes))
    with accelerator.local_main_process_first():  # another machine: its first process copies the Lab's
        if resume_from is not None and not resume_from.exists():
            resume_from = reporter.checkpoint_to_resume() or resume_from
    set_seed(params.seed)
    # staged loading: text encoders and VAE first; they encode what they can and leave, then the denoiser
    family = setup.load_family(family_cls, params, runtime, accelerator, reporter, quantized_text)
    raise_if_stopped(reporter.stop_asked_here, "while the model loaded")
    prompts = parse_prompts(params.eval_prompt)
    settings = EvalSettings(prompts, params.seed, params.eval_steps, params.eval_num_inference_steps,
                            params.eval_guidance_scale, params.resolution, params.eval_num_images,
                            params.eval_every_n_steps, params.eval_also_without_ema)
    load_denoiser = partial(setup.load_denoiser, family, params.base_precision, params.offload, runtime,
                            accelerator, reporter)
    if class_plan and class_plan.missing:  # the base model as it is: no LoRA, its own scheduler
        reporter.info("Prior preservation draws class images with the whole base model: the denoiser loads now, "
                      "and the text encoders stay until the class images are drawn and the captions encoded.")
        load_denoiser()
        if accelerator.is_local_main_process:
            draw = DrawSettings(params.class_prompt, params.seed, params.eval_num_inference_steps,
                                params.eval_guidance_scale, params.resolution)
            generate_class_images(family, class_plan.missing, draw, accelerator.device, reporter,
                                  reporter.stop_asked_here)
        accelerator.wait_for_everyone()
        class_checked = read_class_data(params, class_plan, paths, reporter)
        data_fingerprint = combined_fingerprint(checked, class_checked)
    prediction_type = setup.choose_prediction_type(params, family, reporter)
    family.configure_objective(params, prediction_type)  # reads the denoiser's config only
    for note in family.inapplicable_notes(params):
        reporter.info(note)
    # trained text encoders encode the eval prompts at each eval; frozen ones do it once, now
    trains_text = params.train_text_encoder and any(getattr(family.pipeline, a, None) is not None
                                                    for a in family.trainable_text_attrs)
    recorded = (record_eval_prompts(family, settings, accelerator)
                if prompts and accelerator.is_main_process and not trains_text else None)
    validation_set = None
    if held_out is not None and accelerator.is_main_process:  # encoded now: the encoders are parked below
        validation_set = Validation(family, setup.validation_samples(held_out, params), accelerator,
                                    params.loss_type, params.huber_c)
    spec = AdapterSpec(params.lora_type, params.lora_r, params.lora_alpha, params.lora_dropout, params.lora_init)
    text_adapters = attach_text_adapters(family, spec, params)  # before the text cache: what is trained is not cached
    for note in adapter_notes(params, family_cls.single_file_form):
        reporter.info(note)

    # --- data: encode once where we can, then free the encoders --------------------------
    samples, inputs = setup.prepare_data(family, records, images_fingerprint, params, paths.cache_dir, accelerator,
                                         reporter, masks, checked.masks_fingerprint, class_data=class_checked)
    dataloader = setup.make_dataloader(samples, params, accelerator)

    # --- the denoiser, straight into its storage, then its adapter ----------------------------
    denoiser = family.denoiser if family.denoiser_loaded else load_denoiser()
    raise_if_stopped(reporter.stop_asked_here, "while the model loaded")
    adapters = {"denoiser": Adapter(denoiser, spec, family.lora_targets(params.lora_layers)), **text_adapters}
    text_trainable = [p for a in text_adapters.values() for p in a.trainable]
    trainable = adapters["denoiser"].trainable + text_trainable
    setup.speed_up_denoiser(denoiser, params, runtime, reporter)
    if params.offload == "blocks":
        setup.stream_blocks(denoiser, accelerator, reporter)

    # --- optimizer: steps are global optimizer steps, whatever the number of processes ------------
    planned = steps.plan_steps(len(dataloader), params.gradient_accumulation_steps, params.num_train_epochs,
                                     params.max_train_steps)
    groups = [{"params": adapters["denoiser"].trainable}]
    if text_trainable:
        groups.append({"params": text_trainable, "lr": params.text_encoder_lr or params.learning_rate})
    optimizer, lr_scheduler = setup.make_optimizer(groups, params, planned.total_steps, accelerator)
    max_grad_norm, clipping_note = processes.loop_clipping(accelerator, params.max_grad_norm)
    if clipping_note:
        reporter.warn(clipping_note)
    placement = [params.offload != "blocks", True, True, True]  # offloaded blocks stay where the swap keeps them
    prepared, optimizer, dataloader, lr_scheduler = accelerator.prepare(denoiser, optimizer, dataloader, lr_scheduler,
                                                                        device_placement=placement)
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
    if validation_set is not None:
        validation_set.ema = ema
    run_folder = checkpoints_dir if paths.own_checkpoints_dir else processes.same_on_every_process(
        accelerator, lambda: checkpoint.run_folder_for(resume_from, checkpoints_dir))
    checkpoints = checkpoint.Checkpoints(run_folder, accelerator, denoiser, ema, every=params.checkpointing_steps,
                                         keep=params.checkpoints_total_limit, parameters=params.model_dump(),
                                         data_fingerprint=data_fingerprint, reporter=reporter,
                                         text_encoders={attr: a.module for attr, a in text_adapters.items()})
    setup.check_room(paths, trainable, params, reporter)

    # --- outputs -----------------------------------------------------------------------------
    wandb_kwargs = {"name": params.adaptor_name, "dir": str(paths.logs_dir)}
    if os.environ.get("WANDB_MODE"):
        wandb_kwargs["mode"] = os.environ["WANDB_MODE"].lower()  # not whatever an earlier import fixed
    accelerator.init_trackers("diffusion_trainer", config=setup.tracker_config(params), init_kwargs={"wandb": wandb_kwargs})
    evaluator = Evaluator(family, settings, paths.eval_images_dir if prompts else None, accelerator, ema,
                          reporter.stop_asked_here, validation_set, paths.logs_dir / METRICS_NAME, reporter,
                          validates=held_out is not None, recorded=recorded)
    if evaluator.enabled and accelerator.is_main_process:
        paths.eval_images_dir.mkdir(parents=True, exist_ok=True)
    reporter.record_outputs(eval_images_dir=evaluator.out_dir, tensorboard_dir=paths.logs_dir)
    several = f" x {accelerator.num_processes} processes" if accelerator.num_processes > 1 else ""
    repeated = f" ({len(samples)} samples an epoch with repeats)" if len(samples) != samples.image_count else ""
    reporter.info(f"Training {samples.image_count} images{repeated} for {total_steps} optimizer steps ({num_epochs} epochs, "
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
        evaluator.before(resumed=start is not None, step=start.step if start else 0)
    outcome = loop.run(loop.Training(
        accelerator=accelerator, family=family, denoiser=prepared, trainable=trainable,
        optimizer=optimizer, lr_scheduler=lr_scheduler, dataloader=dataloader, samples=samples,
        inputs=inputs, evaluator=evaluator, reporter=reporter, ema=ema, loss_type=params.loss_type,
        huber_c=params.huber_c, max_grad_norm=max_grad_norm, num_epochs=num_epochs,
        total_steps=total_steps, start=start, checkpoints=checkpoints,
        also_trained=[a.module for a in text_adapters.values()], hand_synced=text_trainable,
        prior_loss_weight=params.prior_loss_weight if class_checked is not None else 0.0))

    # --- the adapter first (a stop has seconds left), then the last checkpoint, then the final eval image ---
    accelerator.wait_for_everyone()
    saved_to, failure = paths.adapter_dir, None
    if accelerator.is_main_process:
        try:
            info = adapter_info(family, params, outcome, prediction_type, adapters)
            kept = checkpoint.existing(run_folder)
            saved_to = adapter.save_somewhere(
                lambda folder: adapter.save_adapter(folder, family, params.adaptor_name, info, ema, samples.image_captions,
                                                    adapters),
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
    if accelerator.is_main_process:
        write_metrics(paths.logs_dir / METRICS_NAME, run_metrics(outcome.steps, outcome.epochs, outcome.final_loss,
                                                                 evaluator.validation_history))
    accelerator.end_training()
    return RunResult("stopped" if stopping else "completed", replace(paths, adapter_dir=saved_to), outcome.steps,
                     outcome.epochs, outcome.final_loss, outcome.losses, evaluator.images, evaluator.validation_history,
                     evaluator.extra_grids, time.monotonic() - started, outcome.timing)


def hold_out(checked: Any, fraction: float, reporter: Any) -> tuple[Any, Any, str, list | None]:
    """(training records, held-out records or None, the training images' fingerprint for the latent cache,
    the training rows' masks or None)."""
    train_rows, held_rows = split_rows(len(checked.records), fraction)
    if not held_rows:
        return checked.records, None, checked.images_fingerprint, checked.masks
    reporter.info(f"validation_split={fraction}: {len(held_rows)} of {len(checked.records)} images held out for the "
                  f"validation loss (never trained on); training on {len(train_rows)}.")
    fingerprint = hashlib.sha256(f"{checked.images_fingerprint} without {held_rows}".encode()).hexdigest()[:20]
    masks = None if checked.masks is None else [checked.masks[row] for row in train_rows]
    return checked.records.select(train_rows), checked.records.select(held_rows), fingerprint, masks


@dataclass(frozen=True)
class ClassPlan:
    folder: Path
    existing: int  # class images a plain folder holds (0 for a listed one: metadata.jsonl, a saved dataset)
    missing: list[Path]  # where the images still to draw go (none for a listed folder)


def plan_class_images(params: TrainingParams, paths: RunPaths, reporter: Any) -> ClassPlan | None:
    """Prior preservation's class folder, checked before anything loads: how many images it has
    and which are still to be drawn. None: no prior preservation."""
    if not params.class_data_dir.strip():
        return None
    if not params.prior_preservation:
        reporter.info("prior_loss_weight=0: prior preservation is off; class_data_dir is not read.")
        return None
    folder = prior.check_class_folder(params.class_data_dir, local_dataset_folder(params.dataset_name),
                                      (paths.adapter_dir, paths.eval_images_dir, paths.logs_dir,
                                       paths.checkpoints_dir, paths.cache_dir))
    if not prior.plain_image_folder(folder):  # its images are listed (metadata.jsonl, a saved dataset)
        return ClassPlan(folder, 0, [])
    existing = prior.count_class_images(folder)
    missing = prior.missing_names(folder, params.num_class_images)
    if missing:
        reporter.info(f"class_data_dir holds {existing} class image(s) of the {params.num_class_images} wanted "
                      f"(num_class_images): {len(missing)} will be drawn with the base model before training.")
    return ClassPlan(folder, existing, missing)


def read_class_data(params: TrainingParams, plan: ClassPlan, paths: RunPaths, reporter: Any) -> CheckedData:
    """The class images, read and checked as the dataset is (any layout), each without a caption
    of its own captioned class_prompt, at most num_class_images of them (diffusers' rule)."""
    problems: list[str] = []
    try:
        records = load_records(str(plan.folder), params.image_column, params.caption_column, problems,
                               params.allow_files_outside_dataset, paths.written(),
                               caption_extension=params.caption_extension, default_caption=params.class_prompt)
        checked = check_dataset(records, image_column=params.image_column, caption_column=params.caption_column,
                                dataset_name=str(plan.folder), skip_bad_images=params.skip_bad_images,
                                resolution=params.resolution, bucketing=params.aspect_ratio_bucketing,
                                load_problems=problems, reporter=reporter)
    except InputError as exc:  # the dataset reader names its own parameter
        raise InputError(str(exc).replace("dataset_name:", "class_data_dir:", 1)) from None
    if len(checked.records) < params.num_class_images and not plan.missing:
        raise InputError(f"class_data_dir: '{plan.folder}' lists {len(checked.records)} usable class image(s), "
                         f"fewer than num_class_images={params.num_class_images}; drawn images are added only to "
                         "a plain folder of images (no metadata.jsonl or saved dataset): lower num_class_images, "
                         "or give such a folder.")
    if len(checked.records) > params.num_class_images:
        checked = replace(checked, records=checked.records.select(range(params.num_class_images)))
    return checked


def combined_fingerprint(checked: CheckedData, class_checked: CheckedData | None) -> str:
    """The data's fingerprint for checkpoints: the instance data's, and the class images' with them."""
    if class_checked is None:
        return checked.fingerprint
    return hashlib.sha256(f"{checked.fingerprint}/{class_checked.fingerprint}".encode()).hexdigest()[:20]


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


def attach_text_adapters(family: Any, spec: AdapterSpec, params: TrainingParams) -> dict[str, Adapter]:
    """With train_text_encoder, an adapter on each CLIP text encoder, by component ("text_encoder",
    "text_encoder_2"); the denoiser's comes once it is loaded (staged loading)."""
    adapters = {}
    if params.train_text_encoder:
        for attr in family.trainable_text_attrs:
            module = getattr(family.pipeline, attr, None)
            if module is not None:
                adapters[attr] = Adapter(module, spec, TEXT_ENCODER_LAYERS[params.text_encoder_lora_layers])
        family.trained_text = tuple(adapters)
    return adapters


def adapter_notes(params: TrainingParams, single_file_form: str) -> list[str]:
    """What the chosen adapter type means for the files it is saved in."""
    from ..lora import BASE_CHANGING_INITS, loaders

    notes = []
    refused = {loader: why for loader, why in loaders(params.lora_type, single_file_form).items() if why.startswith("no")}
    for loader, why in refused.items():
        notes.append(f"lora_type={params.lora_type}: {loader}: {why}.")
    if params.lora_init in BASE_CHANGING_INITS:
        notes.append(f"lora_init={params.lora_init} moves part of the base weights into the adapter while training; "
                     f"the saved adapter is converted to a rank-{2 * params.lora_r} LoRA that loads on the original "
                     "base model.")
    return notes


def adapter_info(family: Any, params: TrainingParams, outcome: loop.Outcome, prediction_type: str | None,
                 adapters: dict[str, Adapter] | None = None) -> dict:
    """The adapter's info file: what it is, for which model, and how it was trained (`adapters`:
    by component; default: the denoiser's PEFT adapter as it is)."""
    from ..lora import lora_metadata

    adapters = adapters or {}
    denoiser = adapters["denoiser"].metadata() if "denoiser" in adapters else lora_metadata(family.denoiser)
    text = {attr: sorted(a.metadata()["target_modules"]) for attr, a in adapters.items() if attr != "denoiser"}
    return adapter.adaptor_info(
        architecture=family.pipeline_class.__name__, base_model=params.model_name,
        rank=denoiser.get("r", params.lora_r), alpha=denoiser.get("lora_alpha", denoiser.get("alpha", params.lora_alpha)),
        target_modules=list(denoiser["target_modules"]), lora_type=params.lora_type, text_encoder_targets=text,
        trigger_word=params.trigger_word, parameters=params.model_dump(), steps_trained=outcome.steps,
        epochs_trained=outcome.epochs, final_loss=outcome.final_loss, prediction_type=prediction_type,
        stopped_early=outcome.stopped, single_file_form=family.single_file_form)
