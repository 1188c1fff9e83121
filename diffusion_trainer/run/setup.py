"""Setting up a run from its parameters: this machine's runtime (TF32, precision, xFormers), the
accelerator and trackers, the model and its speed-ups, the data pipeline and loader, the
optimizer and schedule, and the checks that the output folders can be written and hold the files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..data.batch import ModelInputs
from ..data.buckets import BucketBatchSampler
from ..data.cache import CachedSamples, DiskLatents, TextCache, build_latent_cache
from ..data.check import long_captions
from ..data.images import Augmentation
from ..data.prior import PairedSamples, class_pools
from ..data.samples import TrainingSamples, build_samples
from ..errors import InputError
from ..memory import offload, storage
from ..outputs.layout import RunPaths
from ..params import TrainingParams
from ..reporting import ignore_stop_signals
from . import optimizers, processes

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
    storage.check_storage(params.base_precision)
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
        **processes.accelerator_kwargs(),
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


def load_family(family_cls: Any, params: TrainingParams, runtime: Runtime, accelerator: Any, reporter: Any,
                quantized_text: dict[str, str] | None = None):
    """Staged loading, first stage: the text encoders and the VAE, on the accelerator; the denoiser
    loads once they have done their work (load_denoiser), straight into its storage. `quantized_text`:
    the text encoders the memory plan stores in int8 or nf4 to fit ({attribute: precision})."""
    quantized_text = quantized_text or {}
    weight_dtype = WEIGHT_DTYPES[runtime.mixed_precision]
    stored = "".join(f"; {attr} in {storage.LIBRARIES[bits]}" for attr, bits in quantized_text.items())
    reporter.info(f"Loading {family_cls.label} from {params.model_name} (base weights "
                  f"{str(weight_dtype).removeprefix('torch.')}{stored}) on {accelerator.device}: the text encoders and "
                  "VAE first, the denoiser once what they encode is encoded.")
    family = family_cls.load(params.model_name, weight_dtype, without_denoiser=True)
    for module in family.frozen_modules:
        module.requires_grad_(False)
    for attr, bits in quantized_text.items():
        encoder = getattr(family.pipeline, attr)
        if bits == "int8":
            storage.quantize_int8(encoder)
        else:  # bitsandbytes quantizes the weights as they move to the GPU
            storage.quantize_linears_nf4(encoder, weight_dtype if weight_dtype != torch.float32 else torch.bfloat16)
    for module in family.frozen_modules:
        module.to(accelerator.device)
    return family


def load_denoiser(family: Any, base_precision: str, offload_mode: str, runtime: Runtime, accelerator: Any,
                  reporter: Any) -> torch.nn.Module:
    """The denoiser, read straight into its storage (memory/storage.py), frozen, on the accelerator
    (with offload=blocks its blocks' weights stay in host memory: stream_blocks, once the LoRA is on)."""
    cuda = accelerator.device.type == "cuda"
    compute = WEIGHT_DTYPES[runtime.mixed_precision]
    base = storage.resolve_storage(base_precision, compute, compute)
    denoiser = read_cast_denoiser(family, base, reporter) if base.casts_layers else None
    cast_as_read = denoiser is not None
    if denoiser is None:
        denoiser = family.load_denoiser(**base.load_kwargs(cuda))
        storage.apply_base_storage(denoiser, base, cuda)
    denoiser.requires_grad_(False)
    if offload_mode != "blocks" and not (base.precision == "nf4" and cuda):  # bitsandbytes places 4-bit itself
        denoiser.to(accelerator.device)
    text = [a for a in family.text_encoder_attrs if getattr(family.pipeline, a, None) is not None]
    reporter.info(f"Denoiser loaded: {base.describe()}{' (each tensor cast as it was read)' if cast_as_read else ''}, "
                  f"{storage.stored_bytes(denoiser) / 2**20:.1f} MB of weights"
                  f"{'' if offload_mode == 'blocks' else f' on {accelerator.device}'}; text encoders still loaded: "
                  f"{', '.join(text) or 'none'}.")
    return denoiser


def read_cast_denoiser(family: Any, base: storage.BaseStorage, reporter: Any) -> torch.nn.Module | None:
    """A cast storage's denoiser read tensor by tensor into its storage dtype (memory/cast_loading.py),
    or None (then from_pretrained reads it whole in its load dtype first, and the log says so)."""
    from ..memory.cast_loading import read_cast

    denoiser = read_cast(family.denoiser_class, family.denoiser_config, family.source, family.denoiser_attr,
                         base.load_dtype, lambda model: storage.enable_casting(model, base))
    if denoiser is None:
        reporter.info(f"The {family.denoiser_attr}'s files cannot be read tensor by tensor (old attention names, "
                      f"modules kept in fp32, or no safetensors found): it loads whole in "
                      f"{storage.NAMES[base.load_dtype]} first, then is cast to {base.precision} (host RAM holds "
                      f"its {storage.NAMES[base.load_dtype]} copy meanwhile).")
        return None
    return family.use_denoiser(denoiser)


def stream_blocks(denoiser: torch.nn.Module, accelerator: Any, reporter: Any) -> Any:
    """offload=blocks, once the LoRA is attached: the blocks' frozen weights wait in host memory."""
    swap = offload.stream_blocks(denoiser, accelerator.device)
    where = ("a CPU run: host and device memory are the same, nothing is saved" if accelerator.device.type == "cpu"
             else f"copied to {accelerator.device} as each block runs, {offload.RESIDENT} at a time")
    reporter.info(f"offload=blocks: {len(swap.blocks)} blocks' frozen weights ({swap.host_bytes / 2**20:.1f} MB) "
                  f"stay in host memory, {where}; the LoRA and its optimizer stay on {accelerator.device}.")
    return swap


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
                 accelerator: Any, reporter: Any, masks: list[str | None] | None = None,
                 masks_fingerprint: str = "", class_data: Any = None) -> tuple[Any, ModelInputs]:
    """The training dataset and how batches become model inputs: cached latents and text
    embeddings when asked for, after which the text encoders are freed (kept off the accelerator
    only when a trained one must encode the eval prompts) and the VAE leaves the accelerator (or is
    freed when no eval image will need it). `masks`: each image's mask source with
    masked_loss (the data check's), cached with the latents. `class_data` (the data check's CheckedData
    of the class images): each instance sample is paired with a class sample (data/prior.py)."""
    samples = training_samples(records, params, masks)
    class_samples, slots, slot_images = (class_training_samples(class_data.records, samples.targets, params)
                                         if class_data is not None else (None, {}, []))
    captions = samples.captions + (class_samples.captions if class_samples is not None else [])
    for note in long_captions(family.pipeline, captions):
        reporter.warn(note)
    if params.aspect_ratio_bucketing:
        shapes = sorted(set(samples.targets))
        reporter.info(f"Aspect-ratio buckets in use (height x width): {', '.join(f'{h}x{w}' for h, w in shapes)}.")
    keep_for_eval = bool(params.eval_prompt.strip())  # the validation set is encoded before this
    text_cache = None
    captions_vary = params.shuffle_caption or params.caption_tag_dropout_rate > 0
    trained, frozen = family.trained_text, family.frozen_text_attrs
    if trained:
        reporter.info(f"train_text_encoder: {', '.join(trained)} encode every batch's captions at every step "
                      "(what is trained cannot be cached)"
                      + (f"; {', '.join(frozen)} stay frozen" if frozen else "") + ".")
    if params.cache_text_embeddings and trained and not frozen:
        reporter.info("Text cache: not built, every text encoder is trained.")
    elif params.cache_text_embeddings:
        encode = (lambda prompts: family.encode_text(prompts, frozen)) if trained else family.encode_prompts
        text_cache = TextCache(encode, captions, accelerator.device, stop_asked=reporter.stop_asked_here,
                               encode_missing=captions_vary)
        if captions_vary:
            reporter.info(f"Text cache: {len(text_cache)} distinct captions ({text_cache.size_mb:.1f} MB), "
                          "unshuffled; captions whose tags shuffle_caption or caption_tag_dropout_rate changed "
                          "are encoded as drawn, so the text encoders stay on the accelerator.")
        else:
            # eval prompts were encoded beforehand (evaluate.RecordedPrompts) unless a trained encoder needs them
            keep = bool(trained) and keep_for_eval
            parked = family.park(frozen, keep)
            held = f" of {', '.join(frozen)}" if trained else ""
            fate = (f"moved off the accelerator; they stay, since each eval encodes the eval prompts with the "
                    f"trained {', '.join(trained)}" if keep else "freed")
            reporter.info(f"Text cache{held}: {len(text_cache)} distinct captions ({text_cache.size_mb:.1f} MB); "
                          f"{', '.join(parked)} {fate}.")
    else:
        reporter.info("cache_text_embeddings is off: the text encoders stay on the accelerator beside the denoiser "
                      "and encode every batch.")
    if params.cache_latents:
        store = build_latent_cache(family, samples, model_name=params.model_name, variants=params.latent_cache_variants,
                                   memory_budget_mb=params.cache_memory_budget_mb,
                                   bucketing=params.aspect_ratio_bucketing, images=images_fingerprint,
                                   cache_root=cache_dir, reporter=reporter,
                                   writer_first=accelerator.local_main_process_first, masks=masks_fingerprint)
        samples = CachedSamples(store, samples)
        if class_samples is not None:
            slots_key = hashlib.sha256(repr([class_data.images_fingerprint, slot_images,
                                             class_samples.targets]).encode()).hexdigest()[:20]
            class_store = build_latent_cache(
                family, class_samples, model_name=params.model_name, variants=params.latent_cache_variants,
                memory_budget_mb=params.cache_memory_budget_mb, bucketing=params.aspect_ratio_bucketing,
                images=slots_key, cache_root=cache_dir, reporter=reporter,
                writer_first=accelerator.local_main_process_first)
            class_samples = CachedSamples(class_store, class_samples)
        family.park(("vae",), keep_for_eval)
    else:
        reporter.info("cache_latents is off: the VAE encodes every batch (augmented afresh each time).")
    if class_samples is not None:
        samples = PairedSamples(samples, class_samples, slots)
        reporter.info(f"Prior preservation: each of the {len(samples)} instance samples is paired with one of "
                      f"{len(class_data.records)} class images ('{params.class_prompt}'); loss = instance loss + "
                      f"{params.prior_loss_weight:g} x class loss.")
    return samples, ModelInputs(family, params.caption_dropout_rate, accelerator.device, text_cache,
                                shuffle_caption=params.shuffle_caption, keep_tokens=params.keep_tokens,
                                caption_tag_dropout_rate=params.caption_tag_dropout_rate,
                                trigger_word=params.trigger_word)


def training_samples(records: Any, params: TrainingParams, masks: list[str | None] | None = None) -> Any:
    return build_samples(records, params.image_column, params.caption_column, params.trigger_word,
                         Augmentation.of(params), params.seed, params.aspect_ratio_bucketing,
                         params.dataset_repeats, masks if params.masked_loss else None)


def validation_samples(records: Any, params: TrainingParams) -> Any:
    """The held-out images as the training would see them, without anything random: centre crop, no
    flip, jitter or rotation."""
    fixed = replace(Augmentation.of(params), center_crop=True, random_flip=False, color_jitter=False,
                    random_rotation=False)
    return build_samples(records, params.image_column, params.caption_column, params.trigger_word, fixed,
                         params.seed, params.aspect_ratio_bucketing)


def class_training_samples(records: Any, instance_targets: list[tuple[int, int]], params: TrainingParams):
    """The class images laid out as slots (data/prior.py): each pool's (class image, shape) pairs
    end to end, as one TrainingSamples (no trigger word, no augmentation beyond the instance
    data's), each instance shape's slot indices, and each slot's class image."""
    own = build_samples(records, params.image_column, params.caption_column, "", Augmentation.of(params),
                        params.seed, params.aspect_ratio_bucketing)
    pools = class_pools(instance_targets, own.targets)
    images = [j for pool in pools.values() for j, _ in pool]
    targets = [shape for pool in pools.values() for _, shape in pool]
    slots, start = {}, 0
    for shape, pool in pools.items():
        slots[shape] = list(range(start, start + len(pool)))
        start += len(pool)
    laid_out = TrainingSamples(records.select(images), own.image_column, [own.captions[j] for j in images],
                               own.transform, params.seed, targets)
    return laid_out, slots, images


def make_dataloader(samples: Any, params: TrainingParams, accelerator: Any):
    cuda = accelerator.device.type == "cuda"
    batches = math.ceil(len(samples) / params.train_batch_size)
    # Workers pay off only when items are expensive (decoding, augmenting, reading disk) and an
    # epoch is long enough to amortise starting them; cached latents in memory are neither.
    first = getattr(samples, "instance", samples)  # paired with class samples: judged by the instance data
    expensive = not isinstance(first, CachedSamples) or isinstance(first.store, DiskLatents)
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
    return processes.already_sharded(loader, accelerator)


def make_optimizer(trainable: list[torch.nn.Parameter], params: TrainingParams, total_steps: int, accelerator: Any):
    from diffusers.optimization import get_scheduler

    optimizer = optimizers.make_optimizer(trainable, params, accelerator.device)
    lr_scheduler = get_scheduler(params.lr_scheduler, optimizer,
                                 num_warmup_steps=params.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=total_steps * accelerator.num_processes)
    return optimizer, lr_scheduler
