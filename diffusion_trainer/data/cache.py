"""Encode once. The latent cache holds each training image's VAE posterior (mean and log-variance)
per augmentation variant (with masked_loss, the variant's mask on the latent grid beside it),
keyed by the image, never by the step, so shuffling cannot pair a latent with another image's
caption; a fresh latent is still sampled from it every step, exactly as encoding on the fly
would. An image's repeats draw their variants in turn. The text cache holds each distinct
caption's conditioning.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from .. import atomic
from ..errors import raise_if_stopped
from ..seeds import derived_seed
from .images import upright_sizes
from .samples import TrainingSamples, training_item

ENCODE_BATCH = 8
VARIANT_NAMESPACE = 1_000_000  # seeds of cached variants never coincide with an epoch's


@dataclass
class Variant:
    latent_params: torch.Tensor  # 2C x h x w: the VAE posterior's mean and log-variance
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    mask: torch.Tensor | None = None  # 1 x h x w on the latent grid (masked_loss)


# --- which variants each image needs -----------------------------------------------------------

def variant_plan(samples: TrainingSamples, variants: int) -> tuple[list[list[bool | None]], str]:
    """Per sample, the flip of each cached variant (None: drawn at random with the rest of the
    augmentation), and one sentence saying what was decided."""
    transform = samples.transform
    plan, random_reasons = [], set()
    sizes = upright_sizes(samples.records, samples.image_column)
    for index, size in enumerate(sizes):
        reasons = transform.random_augmentations(size, samples.image_targets[index])
        random_reasons.update(reasons)
        if reasons:
            plan.append([None] * variants)
        elif transform.flip:
            plan.append([False, True])
        else:
            plan.append([False])
    counts = sorted({len(p) for p in plan})
    if random_reasons:
        what = (f"random augmentation ({', '.join(sorted(random_reasons))}): caching "
                f"{variants} augmented variants per such image (latent_cache_variants); set cache_latents "
                "off to augment afresh every step")
    elif transform.flip:
        what = "random_flip: caching each image and its mirror image"
    else:
        what = "no random augmentation: caching one latent per image"
    return plan, f"Latent cache: {what} ({sum(len(p) for p in plan)} latents, {counts} per image)."


def fingerprint(model: str, vae_config: dict, vae_dtype: torch.dtype, samples: TrainingSamples, bucketing: bool,
                images: str, plan: list, masks: str = "") -> str:
    """What a disk cache depends on: model, VAE and the precision it encodes in, the images' bytes
    (`images`: the data check's fingerprint of them, in order), resolution and every augmentation
    setting, and with masked_loss the masks (`masks`: the data check's fingerprint of them)."""
    a = samples.transform.augmentation
    model_path = Path(model).expanduser()
    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                     for p in (model_path / "vae").glob("*")) if model_path.is_dir() else []
    keys = {
        "model": model, "vae_config": {k: v for k, v in vae_config.items() if not k.startswith("_")},
        "vae_dtype": str(vae_dtype),
        "vae_weights": weights, "images": images, "resolution": a.resolution,
        "bucketing": bucketing, "center_crop": a.center_crop,
        "interpolation": a.image_interpolation_mode, "random_flip": a.random_flip,
        "color_jitter": [a.color_jitter, a.color_jitter_brightness, a.color_jitter_contrast,
                         a.color_jitter_saturation, a.color_jitter_hue],
        "rotation": [a.random_rotation, a.rotation_degrees, a.rotation_prob],
        "seed": samples.seed, "plan": plan,
    }
    if samples.masks is not None:
        keys["masks"] = masks
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:20]


# --- stores ------------------------------------------------------------------------------------

class MemoryLatents:
    def __init__(self, entries: list[list[Variant]]):
        self.entries = entries

    def variants(self, index: int) -> int:
        return len(self.entries[index])

    def get(self, index: int, variant: int) -> Variant:
        return self.entries[index][variant]


class DiskLatents:
    """One safetensors file per sample; written to a temporary folder renamed into place when
    complete, so an interrupted run never leaves a cache that looks whole. Read back in the
    run's VAE precision."""

    def __init__(self, folder: Path, dtype: torch.dtype):
        self.folder = folder
        self.dtype = dtype
        self.counts = json.loads((folder / "complete.json").read_text())["variants"]

    def variants(self, index: int) -> int:
        return self.counts[index]

    def get(self, index: int, variant: int) -> Variant:
        with safe_open(str(self.folder / f"{index:07d}.safetensors"), "pt") as f:
            meta = f.get_tensor(f"v{variant}_meta").tolist()
            mask = f.get_tensor(f"v{variant}_mask") if f"v{variant}_mask" in f.keys() else None
            return Variant(f.get_tensor(f"v{variant}").to(self.dtype), tuple(meta[:2]), tuple(meta[2:]), mask)

    @staticmethod
    def write_sample(folder: Path, index: int, variants: list[Variant]) -> None:
        tensors = {}
        for k, v in enumerate(variants):
            tensors[f"v{k}"] = v.latent_params.contiguous()
            tensors[f"v{k}_meta"] = torch.tensor([*v.original_size, *v.crop_top_left])
            if v.mask is not None:
                tensors[f"v{k}_mask"] = v.mask.contiguous()
        save_file(tensors, str(folder / f"{index:07d}.safetensors"))


def encode_variants(family: Any, samples: TrainingSamples, plan: list[list[bool | None]],
                    on_sample_done, stop_asked: Callable[[], bool] = lambda: False) -> None:
    """VAE-encode every (sample, variant) in batches of one shape, calling on_sample_done(index,
    variants) as each sample completes; a stop asked meanwhile ends it (errors.Stopped)."""
    pending: dict[tuple[int, int], list[tuple[int, int, Any]]] = {}
    done: dict[int, list[Variant | None]] = {}

    def flush(shape):
        batch = pending.pop(shape)
        pixels = torch.stack([out.pixels for _, _, out in batch]).to(family.vae.device, family.vae.dtype)
        with torch.no_grad():
            params = family.posterior(pixels).parameters.cpu()
        for (index, k, out), p in zip(batch, params):
            mask = None if out.mask is None else latent_grid(out.mask, tuple(p.shape[-2:]))
            done[index][k] = Variant(p, out.original_size, out.crop_top_left, mask)
            if all(v is not None for v in done[index]):
                on_sample_done(index, done.pop(index))

    for index, flips in enumerate(plan):
        raise_if_stopped(stop_asked, "while the latent cache was encoded")
        image, mask = samples.image_and_mask(index)
        done[index] = [None] * len(flips)
        for k, flip in enumerate(flips):
            seed = derived_seed(samples.seed, VARIANT_NAMESPACE + k, index)
            out = samples.transform(image, seed, samples.image_targets[index], flip=flip, mask=mask)
            shape = tuple(out.pixels.shape[-2:])
            pending.setdefault(shape, []).append((index, k, out))
            if len(pending[shape]) == ENCODE_BATCH:
                flush(shape)
    for shape in list(pending):
        flush(shape)


def latent_grid(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A 1 x H x W pixel mask averaged down to the latent grid (h, w): a latent trains as much as
    the pixels it covers do."""
    if tuple(mask.shape[-2:]) == size:
        return mask
    return F.interpolate(mask[None].float(), size=size, mode="area")[0]


def build_latent_cache(family: Any, samples: TrainingSamples, *, model_name: str, variants: int, memory_budget_mb: float,
                       bucketing: bool, images: str, cache_root: Path, reporter: Any,
                       writer_first: Callable[[], Any] = nullcontext, masks: str = "") -> MemoryLatents | DiskLatents:
    """The latent store: in memory within cache_memory_budget_mb (every process encodes its own:
    each needs every sample), else on disk, reused when complete. writer_first() is entered by
    every process around the disk cache: with several processes on a machine, one writes while
    the others wait, then reuse it."""
    plan, message = variant_plan(samples, variants)
    reporter.info(message)
    dtype = family.vae.dtype
    key = fingerprint(model_name, dict(family.vae.config), dtype, samples, bucketing, images, plan, masks)
    folder = cache_root / f"latents-{key}"
    channels = 2 * family.latent_channels + (samples.masks is not None)  # a mask: about one more
    scale = family.vae_downscale
    element = torch.finfo(family.vae.dtype).bits // 8
    size_mb = sum(len(flips) * channels * (h // scale) * (w // scale) * element
                  for flips, (h, w) in zip(plan, samples.image_targets)) / 2**20
    if size_mb <= memory_budget_mb:
        if (folder / "complete.json").is_file():  # an earlier run's (no process writes it in this one)
            reporter.info(f"Reusing the latent cache in {folder}.")
            return DiskLatents(folder, dtype)
        started = time.monotonic()
        entries: list[list[Variant]] = [[] for _ in plan]
        encode_variants(family, samples, plan, lambda index, variants: entries.__setitem__(index, variants),
                        reporter.stop_asked_here)
        reporter.info(f"Encoded {size_mb:.1f} MB of latents in {time.monotonic() - started:.1f} s (kept in memory).")
        return MemoryLatents(entries)
    with writer_first():
        if (folder / "complete.json").is_file():
            reporter.info(f"Reusing the latent cache in {folder}.")
            return DiskLatents(folder, dtype)
        started = time.monotonic()
        write_disk_cache(family, samples, plan, folder, reporter.stop_asked_here)
    reporter.info(f"Encoded {size_mb:.1f} MB of latents in {time.monotonic() - started:.1f} s into {folder} "
                  f"(over cache_memory_budget_mb={memory_budget_mb}); later runs reuse it.")
    return DiskLatents(folder, dtype)


def write_disk_cache(family: Any, samples: TrainingSamples, plan: list[list[bool | None]], folder: Path,
                     stop_asked: Callable[[], bool] = lambda: False) -> None:
    def fill(staging: Path) -> None:
        encode_variants(family, samples, plan, lambda index, variants: DiskLatents.write_sample(staging, index, variants),
                        stop_asked)
        (staging / "complete.json").write_text(json.dumps({"variants": [len(p) for p in plan]}))

    # another process (another machine on a shared disk) may finish the same cache first: keep theirs
    atomic.write_folder(folder, fill, keep_existing=True)


class CachedSamples(torch.utils.data.Dataset):
    """Training items from the latent cache: one variant per sample per epoch, drawn from the seed;
    the repeats of an image take the variants after it in turn (all differ while there are enough)."""

    def __init__(self, store: MemoryLatents | DiskLatents, samples: TrainingSamples):
        self.store = store
        self.captions = samples.captions
        self.image_captions = samples.image_captions
        self.targets = samples.targets
        self.draws = samples.draws
        self.seed = samples.seed
        self.epoch = 0

    @property
    def image_count(self) -> int:
        return len(self.image_captions)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.draws)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, repeat = self.draws[index]
        count = self.store.variants(image)
        variant = 0 if count == 1 else (derived_seed(self.seed, self.epoch, image) + repeat) % count
        cached = self.store.get(image, variant)
        extra = {} if cached.mask is None else {"mask": cached.mask}
        return training_item(index, self.captions[index], cached.original_size, cached.crop_top_left,
                             self.targets[index], latent_params=cached.latent_params, **extra)


# --- text ----------------------------------------------------------------------------------------

DEVICE_TEXT_CACHE_MB = 512  # larger text caches (T5's are big) stay in host memory


class TextCache:
    """Each distinct caption's conditioning, computed once; looked up by caption every step."""

    def __init__(self, encode: Callable[[list[str]], dict[str, torch.Tensor]], captions: list[str],
                 device: torch.device, batch_size: int = 16, stop_asked: Callable[[], bool] = lambda: False,
                 encode_missing: bool = False):
        """`encode`: the family's encoder (all of its conditioning, or only the frozen encoders' parts
        while others are trained); `encode_missing`: a batch holding a caption the cache lacks is
        encoded with it, else such a caption is an error."""
        self.encode = encode
        self.encode_missing = encode_missing
        unique = sorted(set(captions) | {""})
        self.rows = {caption: row for row, caption in enumerate(unique)}
        parts: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(unique), batch_size):
            raise_if_stopped(stop_asked, "while the text cache was built")
            with torch.no_grad():
                encoded = encode(unique[start:start + batch_size])
            for key, value in encoded.items():
                parts.setdefault(key, []).append(value)
        tensors = {key: torch.cat(values) for key, values in parts.items()}
        size_mb = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20
        self.device = device
        home = device if size_mb <= DEVICE_TEXT_CACHE_MB else torch.device("cpu")
        self.tensors = {k: v.to(home) for k, v in tensors.items()}
        self.size_mb = size_mb

    def __len__(self) -> int:
        return len(self.rows)

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if self.encode_missing and any(c not in self.rows for c in captions):
            with torch.no_grad():
                return self.encode(captions)  # a caption drawn afresh (tags shuffled or dropped)
        rows = torch.tensor([self.rows[c] for c in captions])
        return {k: v[rows.to(v.device)].to(self.device, non_blocking=True) for k, v in self.tensors.items()}
