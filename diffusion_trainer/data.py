"""Training data: where image+caption pairs come from, and how each image becomes a tensor.

Sources: a hub id, a folder saved with `save_to_disk`, an imagefolder with metadata.jsonl
(or .csv), or a folder of images with same-named .txt captions. Each sample's transform is
seeded from (seed, epoch, index), so a run is repeatable whatever the worker count, and
records the original size and the crop it made (SDXL conditions on both).
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import transforms
from torchvision.transforms import functional as TF

from .errors import InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
INTERPOLATION = {
    "lanczos": transforms.InterpolationMode.LANCZOS,
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "bicubic": transforms.InterpolationMode.BICUBIC,
    "nearest": transforms.InterpolationMode.NEAREST,
}


# --- sources -----------------------------------------------------------------------------

def load_records(dataset_name: str, image_column: str, caption_column: str, problems: list[str] | None = None,
                 allow_outside: bool = False, skip_folders: tuple[Path, ...] = ()):
    """The dataset's training split as a `datasets.Dataset`, with both columns checked.

    Rows of a local folder that cannot be used (a caption file that is not UTF-8, a metadata line
    that is not JSON or names no file, a file outside the folder unless `allow_outside`, images
    sharing one caption file) are left out and described in `problems`; without that list the
    first one raises InputError. A folder of captioned images is listed without its hidden files
    and folders and without `skip_folders` (the run's own outputs)."""
    path = Path(dataset_name).expanduser()
    found: list[str] = [] if problems is None else problems
    if path.is_dir():
        records = _load_folder(path, image_column, caption_column, found, allow_outside, skip_folders)
    elif path.exists():
        raise InputError(f"dataset_name: '{dataset_name}' is a file; give a dataset folder or a hub id.")
    elif dataset_name.startswith((".", "/", "~")) or dataset_name.count("/") > 1:
        raise InputError(f"dataset_name: there is no folder '{dataset_name}'.")
    else:
        records = _load_hub(dataset_name)
    if problems is None and found:
        raise InputError(f"dataset_name: {found[0]}")
    _check_columns(records, dataset_name, image_column, caption_column)
    return records


def _load_hub(dataset_id: str):
    import datasets

    try:
        return datasets.load_dataset(dataset_id, split="train")
    except Exception as exc:
        raise InputError(f"dataset_name: could not load '{dataset_id}' from the hub "
                         f"({type(exc).__name__}: {exc}).") from None


def _load_folder(path: Path, image_column: str, caption_column: str, problems: list[str], allow_outside: bool,
                 skip_folders: tuple[Path, ...]):
    import datasets

    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            split = "train" if "train" in loaded else next(iter(loaded))
            loaded = loaded[split]
        return loaded
    metadata = _metadata_files(path)
    if metadata:
        return _load_metadata(path, metadata, problems, allow_outside)
    return _load_captioned_images(path, image_column, caption_column, problems, allow_outside, skip_folders)


def _metadata_files(path: Path) -> list[Path]:
    """metadata.jsonl/.csv at the top; else where Lab-made datasets keep them, under train/ and
    train/<label>/ (the layouts datasets' imagefolder reads)."""
    def found(folder: Path) -> list[Path]:
        return [folder / name for name in ("metadata.jsonl", "metadata.csv") if (folder / name).is_file()][:1]

    train = path / "train"
    labels = sorted(p for p in train.iterdir() if p.is_dir()) if train.is_dir() else []
    return found(path) or [file for folder in (train, *labels) for file in found(folder)]


def _outside(path: Path, folder: Path) -> bool:
    return not path.resolve().is_relative_to(folder.resolve())


def _metadata_rows(metadata: Path, problems: list[str]) -> list[tuple[str, dict]]:
    """(where, row) for each readable row of metadata.jsonl / metadata.csv."""
    import csv

    try:
        text = metadata.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        problems.append(f"{metadata}: not UTF-8 text ({exc.reason} at byte {exc.start})")
        return []
    if metadata.suffix == ".csv":
        return [(f"{metadata.name} row {n}", row) for n, row in enumerate(csv.DictReader(io.StringIO(text)), 2)]
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{metadata.name} line {n}: not valid JSON ({exc.msg})")
            continue
        if not isinstance(row, dict):
            problems.append(f"{metadata.name} line {n}: not a JSON object")
            continue
        rows.append((f"{metadata.name} line {n}", row))
    return rows


def _load_metadata(folder: Path, metadata_files: list[Path], problems: list[str], allow_outside: bool):
    """An imagefolder: metadata rows with file_name (relative to the metadata file's folder) and other
    columns; the images land in an `image` column, as datasets' imagefolder loader names it."""
    import datasets

    columns: dict[str, list] = {"image": []}
    kept = 0
    rows = [(metadata, where, row) for metadata in metadata_files for where, row in _metadata_rows(metadata, problems)]
    for metadata, where, row in rows:
        name = row.get("file_name")
        if not isinstance(name, str) or not name.strip():
            problems.append(f"{where}: no file_name")
            continue
        file = metadata.parent / name
        if not file.is_file():
            problems.append(f"{where}: file_name '{name}' is not a file in {metadata.parent}")
            continue
        if not allow_outside and _outside(file, folder):
            problems.append(f"{file}: leads outside the dataset folder (to {file.resolve()}); set "
                            "allow_files_outside_dataset to use it")
            continue
        for key, value in row.items():
            if key != "file_name":
                columns.setdefault(key, [None] * kept).append(value)
        columns["image"].append(str(file))
        kept += 1
        for values in columns.values():
            values.extend([None] * (kept - len(values)))
    if not kept:
        raise InputError(f"dataset_name: {', '.join(map(str, metadata_files))} list no usable image" +
                         (f" ({len(problems)} problem(s), e.g. {problems[0]})." if problems else "."))
    return datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image())


def listed_files(folder: Path, skip_folders: tuple[Path, ...] = ()) -> list[Path]:
    """The files under `folder`, sorted, without hidden ones (a name starting with '.', such as
    macOS's `._photo.png`, or anything inside a hidden folder) and without what lies in
    `skip_folders` that lie inside `folder` (the run's output folder, say)."""
    root = folder.resolve()
    skipped = [s for s in (Path(f).expanduser().resolve() for f in skip_folders) if s != root and s.is_relative_to(root)]
    in_skipped: dict[Path, bool] = {}  # per parent folder
    files = []
    for file in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in file.relative_to(folder).parts):
            continue
        if file.parent not in in_skipped:
            in_skipped[file.parent] = any(file.parent.resolve().is_relative_to(s) for s in skipped)
        if not in_skipped[file.parent] and file.is_file():
            files.append(file)
    return files


def caption_files(images: list[Path], files: list[Path], problems: list[str]) -> tuple[dict[Path, Path], set[Path]]:
    """({image: its caption}, the images refused): the caption is the `.txt` beside the image with
    the same stem, its extension in any case (`B.JPG` + `B.TXT`). Images that would share one
    caption (`a.png`, `a.jpg` and `a.txt`), or whose caption is ambiguous (`a.txt` and `a.TXT`),
    are refused, each case described in `problems`."""
    by_stem: dict[tuple[Path, str], list[Path]] = {}
    for file in files:
        if file.suffix.lower() == ".txt":
            by_stem.setdefault((file.parent, file.stem), []).append(file)
    images_by_stem: dict[tuple[Path, str], list[Path]] = {}
    for image in images:
        images_by_stem.setdefault((image.parent, image.stem), []).append(image)
    found, refused = {}, set()
    for key, same_stem in images_by_stem.items():
        captions = by_stem.get(key, [])
        if len(same_stem) > 1 and captions:
            problems.append(f"{', '.join(p.name for p in same_stem)} in {key[0]} share one caption file "
                            f"{captions[0].name}; give each image its own (rename all but one)")
            refused.update(same_stem)
        elif len(captions) > 1:
            problems.append(f"{same_stem[0]}: has {len(captions)} caption files "
                            f"({', '.join(p.name for p in captions)}); keep one")
            refused.update(same_stem)
        elif captions:
            found[same_stem[0]] = captions[0]
    return found, refused


def _load_captioned_images(path: Path, image_column: str, caption_column: str, problems: list[str],
                           allow_outside: bool, skip_folders: tuple[Path, ...] = ()):
    import datasets

    files = listed_files(path, skip_folders)
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise InputError(f"dataset_name: folder '{path}' holds no images "
                         f"({', '.join(sorted(IMAGE_SUFFIXES))}), no metadata.jsonl and no saved dataset.")
    captions_of, refused = caption_files(images, files, problems)
    uncaptioned = [p.name for p in images if p not in captions_of and p not in refused]
    if uncaptioned:
        raise InputError(f"dataset_name: {len(uncaptioned)} image(s) in '{path}' have no caption file "
                         f"(e.g. {uncaptioned[0]} needs {Path(uncaptioned[0]).stem}.txt beside it), and "
                         "there is no metadata.jsonl.")
    kept, captions = [], []
    for image, caption_file in captions_of.items():
        outside = [f for f in (image, caption_file) if _outside(f, path)]
        if outside and not allow_outside:
            problems.extend(f"{f}: leads outside the dataset folder (to {f.resolve()}); set "
                            "allow_files_outside_dataset to use it" for f in outside)
            continue
        try:
            captions.append(caption_file.read_text(encoding="utf-8").strip())
        except UnicodeDecodeError as exc:
            problems.append(f"{caption_file}: caption is not UTF-8 text ({exc.reason} at byte {exc.start})")
            continue
        kept.append(image)
    if not kept:
        raise InputError(f"dataset_name: no usable image in '{path}' ({len(problems)} problem(s), "
                         f"e.g. {problems[0]}).")
    table = datasets.Dataset.from_dict({image_column: [str(p) for p in kept], caption_column: captions})
    return table.cast_column(image_column, datasets.Image())


def _check_columns(records, dataset_name: str, image_column: str, caption_column: str) -> None:
    if len(records) == 0:
        raise InputError(f"dataset_name: '{dataset_name}' has no training rows.")
    columns = list(records.column_names)
    for name, column in (("image_column", image_column), ("caption_column", caption_column)):
        if column not in columns:
            raise InputError(f"{name}: '{column}' is not a column of '{dataset_name}'; its columns "
                             f"are: {', '.join(columns)}.")


# --- captions ----------------------------------------------------------------------------

def caption_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):  # several captions per image: use the first
        value = value[0] if value else ""
    return "" if value is None else str(value).strip()


def with_trigger(caption: str, trigger_word: str) -> str:
    """The caption with the trigger word in front, unless it already holds it as a word."""
    trigger = trigger_word.strip()
    if not trigger or re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption):
        return caption
    return f"{trigger} {caption}" if caption else trigger


def drop_captions(captions: list[str], rate: float) -> list[str]:
    """Replace each caption by the empty one with probability `rate` (torch's seeded RNG)."""
    if rate <= 0:
        return list(captions)
    keep = torch.rand(len(captions)) >= rate
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


# --- images ------------------------------------------------------------------------------

MAX_IMAGE_PIXELS = 100_000_000  # larger images are refused (or skipped) as oversized, e.g. 10000 x 10000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # PIL warns above this and refuses above twice it


def to_rgb(image: Any) -> Image.Image:
    """A PIL RGB image, turned upright per its EXIF orientation, transparency over white. 16- and
    32-bit grayscale keep their tones (PIL's own conversion clips them to white), CMYK and palette
    images convert through PIL."""
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":
        image = _eight_bit_gray(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def _eight_bit_gray(image: Image.Image) -> Image.Image:
    """An "I;16*", "I" or "F" grayscale image as 8-bit "L": 16-bit ranges scaled by 1/257, float
    images taken as 0-1 unless their values reach past 1 (then as 0-255)."""
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0
    else:
        scale = 255.0 / 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 1.0
    return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), mode="L")


EXIF_ORIENTATION, SWAPS_SIDES = 0x0112, {5, 6, 7, 8}  # orientations that turn the picture 90 degrees


def upright_sizes(records, column: str) -> list[tuple[int, int]]:
    """Each image's (height, width) as to_rgb will return it, read from the file headers: the
    pixels are not decoded (datasets decodes every image it hands out, so ask it for the files)."""
    import datasets

    if isinstance(records.features.get(column), datasets.Image):
        records = records.cast_column(column, datasets.Image(decode=False))
    sizes = []
    for item in records[column]:
        if isinstance(item, dict):
            item = io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]
        with (item if isinstance(item, Image.Image) else Image.open(item)) as image:
            width, height = image.size
            if image.getexif().get(EXIF_ORIENTATION) in SWAPS_SIDES:
                width, height = height, width
        sizes.append((height, width))
    return sizes


@dataclass(frozen=True)
class Transformed:
    pixels: torch.Tensor  # 3 x H x W in [-1, 1]
    original_size: tuple[int, int]  # (height, width) before resizing
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image
    flipped: bool


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def covering_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of `size` scaled so that it just covers `target` (both (height, width))."""
    scale = max(target[0] / size[0], target[1] / size[1])
    return max(target[0], round(size[0] * scale)), max(target[1], round(size[1] * scale))


class ImageTransform:
    """Resize to cover the target shape, crop to it, then the optional augmentations."""

    def __init__(self, params: Any):
        self.size = params.resolution
        self.interpolation = INTERPOLATION[params.image_interpolation_mode]
        self.center_crop = params.center_crop
        self.flip = params.random_flip
        self.jitter = transforms.ColorJitter(
            brightness=params.color_jitter_brightness, contrast=params.color_jitter_contrast,
            saturation=params.color_jitter_saturation, hue=params.color_jitter_hue,
        ) if params.color_jitter else None
        self.rotation = transforms.RandomRotation(params.rotation_degrees) if params.random_rotation else None
        self.rotation_prob = params.rotation_prob

    def random_augmentations(self, size: tuple[int, int], target: tuple[int, int]) -> list[str]:
        """What makes this image (height, width) come out differently each time, flips aside."""
        reasons = []
        if not self.center_crop and covering_size(size, target) != target:
            reasons.append("random crop")
        if self.jitter is not None:
            reasons.append("color_jitter")
        if self.rotation is not None and self.rotation_prob > 0:
            reasons.append("random_rotation")
        return reasons

    def __call__(self, image: Image.Image, seed: int, target: tuple[int, int] | None = None,
                 flip: bool | None = None) -> Transformed:
        """`flip` None draws it (when random_flip is on); True/False forces it (cached variants)."""
        target = target or (self.size, self.size)
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)  # torch.manual_seed would reseed CUDA too
            original_size = (image.height, image.width)
            resized = covering_size(original_size, target)
            image = TF.resize(image, list(resized), interpolation=self.interpolation)
            drawn = bool(self.flip and torch.rand(()) < 0.5)
            flipped = drawn if flip is None else flip
            if flipped:
                image = TF.hflip(image)
            if self.center_crop:
                top = round((resized[0] - target[0]) / 2)
                left = round((resized[1] - target[1]) / 2)
            else:
                top, left, _, _ = transforms.RandomCrop.get_params(image, target)
            image = TF.crop(image, top, left, target[0], target[1])
            if self.jitter is not None:
                image = self.jitter(image)
            if self.rotation is not None and torch.rand(()) < self.rotation_prob:
                image = self.rotation(image)
            pixels = TF.normalize(TF.to_tensor(image), [0.5], [0.5])
        return Transformed(pixels, original_size, (top, left), flipped)


class TrainingSamples(torch.utils.data.Dataset):
    """Each item: index, pixel_values, caption (trigger word in), original_size, crop_top_left."""

    def __init__(self, records, image_column: str, captions: list[str], transform: ImageTransform,
                 seed: int, targets: list[tuple[int, int]] | None = None):
        self.records = records
        self.image_column = image_column
        self.captions = captions
        self.transform = transform
        self.seed = seed
        self.targets = targets or [(transform.size, transform.size)] * len(records)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def image(self, index: int) -> Image.Image:
        return to_rgb(self.records[index][self.image_column])

    def __getitem__(self, index: int) -> dict[str, Any]:
        out = self.transform(self.image(index), sample_seed(self.seed, self.epoch, index), self.targets[index])
        return training_item(index, self.captions[index], out.original_size, out.crop_top_left,
                             self.targets[index], pixel_values=out.pixels)


def training_item(index: int, caption: str, original_size: tuple[int, int], crop_top_left: tuple[int, int],
                  target_size: tuple[int, int], **image: torch.Tensor) -> dict[str, Any]:
    """One dataset item, whether its image comes as pixels or as cached latent parameters."""
    return {"index": index, "caption": caption, "original_size": torch.tensor(original_size),
            "crop_top_left": torch.tensor(crop_top_left), "target_size": torch.tensor(target_size), **image}


# --- aspect-ratio buckets --------------------------------------------------------------------

# The aspect ratios (width:height) of diffusers' bucket ladder (training_utils, from 0.40);
# written out here because the oldest diffusers requirements.txt allows does not have it.
BUCKET_ASPECT_RATIOS = ((1, 1), (4, 5), (5, 4), (2, 3), (3, 2), (3, 4), (4, 3), (9, 16), (16, 9), (1, 2), (2, 1))
BUCKET_MULTIPLE = 64


def bucket_ladder(resolution: int, multiple: int = BUCKET_MULTIPLE) -> list[tuple[int, int]]:
    """The (height, width) buckets: for each aspect ratio, about resolution^2 pixels with both
    sides rounded to the multiple (diffusers' generate_aspect_ratio_buckets does the same)."""
    buckets: list[tuple[int, int]] = []
    for ratio_w, ratio_h in BUCKET_ASPECT_RATIOS:
        height = resolution * math.sqrt(ratio_h / ratio_w)
        width = height * ratio_w / ratio_h
        bucket = (max(multiple, round(height / multiple) * multiple), max(multiple, round(width / multiple) * multiple))
        if bucket not in buckets:
            buckets.append(bucket)
    return buckets


def bucket_targets(images: list[tuple[int, int]], resolution: int) -> list[tuple[int, int]]:
    """Each image's (height, width) bucket: the one whose aspect ratio is closest to the image's,
    on a log scale. (diffusers' find_nearest_bucket compares areas, which ties and misplaces
    images at small sizes.)"""
    buckets = bucket_ladder(resolution)
    return [min(buckets, key=lambda b: abs(math.log((w / h) / (b[1] / b[0])))) for h, w in images]


class BucketBatchSampler(torch.utils.data.Sampler):
    """This process's share of each epoch's exact plan: full batches that never mix shapes.

    A bucket whose images do not fill its last batch is topped up with seeded repeats of its own
    images, and the epoch's batch count with seeded extra batches up to a multiple of the
    processes; the plan is shuffled and dealt out in turn (batch k to process k mod processes). So
    every image is trained at least once an epoch, every process makes len() batches of one size,
    and the plan is a pure function of (seed, the dataset's epoch), so a resumed run can skip the
    batches it already trained on. Without bucketing every image has the same shape: one bucket."""

    def __init__(self, samples: Any, batch_size: int, seed: int, num_processes: int = 1, process_index: int = 0):
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index} is not one of {num_processes} processes")
        self.samples = samples
        self.batch_size = batch_size
        self.seed = seed
        self.num_processes = num_processes
        self.process_index = process_index
        self.groups: dict[tuple[int, int], list[int]] = {}
        for index, target in enumerate(samples.targets):
            self.groups.setdefault(tuple(target), []).append(index)

    def __len__(self) -> int:
        batches = sum(-(-len(group) // self.batch_size) for group in self.groups.values())
        return -(-batches // self.num_processes)

    def epoch_plan(self, epoch: int) -> list[list[int]]:
        """Every process's batches of `epoch`, in training order."""
        epoch_seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(epoch_seed)
        groups = list(self.groups.values())
        batches = [batch for group in groups for batch in bucket_batches(group, self.batch_size, generator)]
        batches += extra_batches(groups, self.batch_size, -len(batches) % self.num_processes, generator)
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def __iter__(self):
        yield from self.epoch_plan(self.samples.epoch)[self.process_index::self.num_processes]


def _shuffled(indices: list[int], generator: torch.Generator) -> list[int]:
    return [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]


def _draw(pool: list[int], count: int, generator: torch.Generator) -> list[int]:
    """`count` of `pool`, none drawn twice before every one has been drawn once."""
    drawn: list[int] = []
    while len(drawn) < count:
        drawn += _shuffled(pool, generator)
    return drawn[:count]


def bucket_batches(group: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One bucket's images in full batches, each once, the last batch topped up with repeats of
    images from the other batches (of its own images when the bucket fills less than one)."""
    order = _shuffled(group, generator)
    short = len(order) % batch_size
    if short:
        others = order[:len(order) - short] or order
        order += _draw(others, batch_size - short, generator)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def extra_batches(groups: list[list[int]], batch_size: int, count: int,
                  generator: torch.Generator) -> list[list[int]]:
    """`count` more full batches, each from one bucket chosen in proportion to its batches."""
    if not count:
        return []
    weights = torch.tensor([-(-len(group) // batch_size) for group in groups], dtype=torch.float64)
    chosen = torch.multinomial(weights, count, replacement=True, generator=generator).tolist()
    return [_draw(groups[k], batch_size, generator) for k in chosen]


def build_samples(records, params: Any) -> TrainingSamples:
    captions = [with_trigger(caption_text(c), params.trigger_word) for c in records[params.caption_column]]
    transform = ImageTransform(params)
    targets = None
    if params.aspect_ratio_bucketing:
        targets = bucket_targets(upright_sizes(records, params.image_column), params.resolution)
    return TrainingSamples(records, params.image_column, captions, transform, params.seed, targets)
