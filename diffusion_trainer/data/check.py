"""Bad data caught before training, by name: every image is opened and fully decoded once (before
the model loads), so a broken, truncated, non-image or oversized file, or an unreadable caption, is
named in one report instead of crashing the run when its batch comes up, and an image that training
will upscale or crop a lot is named in a note. With masked_loss, each image's mask is found and
checked in the same pass (masks.py). The same pass fingerprints the data (every file's bytes and
caption, in order, the folders' repeats and the masks) for checkpoints.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import InputError, raise_if_stopped
from .buckets import bucket_targets
from .images import MAX_IMAGE_PIXELS, covering_size, to_rgb
from .masks import ALPHA, MaskFiles, find_mask, mask_report
from .sources import REPEATS_COLUMN


@dataclass
class CheckedData:
    records: Any  # the usable rows
    fingerprint: str  # of every image's bytes and caption, in order
    skipped: list[str]  # what was left out (skip_bad_images)
    images_fingerprint: str = ""  # of every image's bytes, in order (what the latent cache depends on)
    masks: list[str | None] | None = None  # with masked_loss, each row's mask (a file, masks.ALPHA, or None)
    masks_fingerprint: str = ""  # of every mask file's bytes (with masked_loss), for the latent cache


def _source(item: Any, row: int) -> tuple[str, bytes]:
    """(a name for the user, the file's bytes) of one undecoded `datasets.Image` item."""
    if isinstance(item, dict):
        path = item.get("path")
        if item.get("bytes"):
            return path or f"row {row}", item["bytes"]
        return path, Path(path).read_bytes()
    if isinstance(item, Image.Image):  # an in-memory image: encode it to hash it
        buffer = io.BytesIO()
        item.save(buffer, format="PNG")
        return f"row {row}", buffer.getvalue()
    return str(item), Path(str(item)).read_bytes()


def inspect_image(data: bytes) -> tuple[tuple[int, int] | None, str | None]:
    """(its upright (height, width), None) for a usable image, else (None, why it is not)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    return None, f"oversized: {width}x{height} is over {MAX_IMAGE_PIXELS // 10**6} megapixels"
                image.load()  # the whole file: a truncated one fails here
                width, height = to_rgb(image).size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return None, f"oversized ({exc})"
    except Image.UnidentifiedImageError:
        return None, "not an image PIL can read"
    except Exception as exc:  # truncated, corrupt, an unsupported mode…
        return None, f"cannot be decoded ({type(exc).__name__}: {exc})"
    return (height, width), None


MAX_UPSCALE, MIN_KEPT = 2.0, 0.25  # beyond these an image is worth a note: detail invented, or most of it cut
MAX_LISTED = 20


def resize_notes(names: list[str], sizes: list[tuple[int, int]], targets: list[tuple[int, int]]) -> list[str]:
    """One line per image the transform enlarges more than MAX_UPSCALE times, or crops to less than
    MIN_KEPT of itself, to cover its (height, width) target."""
    notes = []
    for name, size, target in zip(names, sizes, targets):
        resized = covering_size(size, target)
        scale = resized[0] / size[0]
        kept = target[0] * target[1] / (resized[0] * resized[1])
        what = ([f"upscaled {scale:.1f}x"] if scale > MAX_UPSCALE else []) + (
            [f"cropped to {kept:.1%} of itself"] if kept < MIN_KEPT else [])
        if what:
            notes.append(f"{name} ({size[1]}x{size[0]}): {' and '.join(what)} to fit {target[1]}x{target[0]}")
    return notes


def report_resizing(notes: list[str], reporter: Any) -> None:
    if not notes:
        return
    more = f"\n  ... and {len(notes) - MAX_LISTED} more" if len(notes) > MAX_LISTED else ""
    reporter.info(f"Note: {len(notes)} image(s) are resized a lot for training (width x height; upscaling "
                  f"blurs, a small crop loses most of the picture):\n  " + "\n  ".join(notes[:MAX_LISTED]) + more)


def check_dataset(records: Any, *, image_column: str, caption_column: str, dataset_name: str, skip_bad_images: bool,
                  resolution: int, bucketing: bool, load_problems: list[str], reporter: Any,
                  masked_loss: bool = False) -> CheckedData:
    """Decode every image once; refuse the run listing every problem (exit 2), or with
    skip_bad_images leave those rows out and say which. Images resized a lot to their training
    shape are named in a note. With `masked_loss` each image's mask is found: one that cannot be
    used (undecodable, not its image's size, two of them) is a problem like a broken image;
    images without one train on the whole image and are named in a note; none at all is refused."""
    import datasets

    column = image_column
    raw = records.cast_column(column, datasets.Image(decode=False)) if isinstance(
        records.features.get(column), datasets.Image) else records
    items, captions = raw[column], records[caption_column]

    mask_files, listing = MaskFiles(), threading.Lock()

    def inspect(row: int) -> tuple[str, bytes | None, tuple[int, int] | None, str | None, str | None]:
        try:
            name, data = _source(items[row], row)
        except OSError as exc:
            return f"row {row}", None, None, f"cannot be read ({exc.strerror or exc})", None
        size, why = inspect_image(data)
        mask = None
        if masked_loss and not why:
            with listing:  # the masks/ folders are listed once, by whichever thread comes first
                mask_files.of(Path(name))
            mask, why = find_mask(name, data, size, mask_files)
        return name, data, size, why, mask

    workers = max(1, min(8, os.cpu_count() or 1))
    pool = ThreadPoolExecutor(workers)  # PIL decodes outside the GIL
    results = []
    try:
        for result in pool.map(inspect, range(len(records))):
            results.append(result)
            raise_if_stopped(reporter.stop_asked_here, "during the data check")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # a stop does not wait for the rest
    problems = list(load_problems) + [f"{name}: {why}" for name, _, _, why, _ in results if why]
    good = [row for row, (_, _, _, why, _) in enumerate(results) if not why]
    if problems and not skip_bad_images:
        raise InputError(f"dataset_name: {len(problems)} unusable file(s) or row(s) in '{dataset_name}':\n  "
                         + "\n  ".join(problems) + "\n  Fix or remove them, or set skip_bad_images to train "
                         "without them.")
    if problems:
        if not good:
            raise InputError(f"dataset_name: no usable image in '{dataset_name}' "
                             f"({len(problems)} problem(s), e.g. {problems[0]}).")
        reporter.warn(f"skip_bad_images: training without {len(problems)} unusable file(s) or row(s):\n  "
                      + "\n  ".join(problems))
        records = records.select(good)
    sizes = [results[row][2] for row in good]
    targets = bucket_targets(sizes, resolution) if bucketing else [(resolution, resolution)] * len(good)
    report_resizing(resize_notes([results[row][0] for row in good], sizes, targets), reporter)
    masks = [results[row][4] for row in good] if masked_loss else None
    if masks is not None:
        check_masks(masks, [results[row][0] for row in good], dataset_name, reporter)
    digest, images, mask_digest = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    for row in good:
        image_digest = hashlib.sha256(results[row][1]).digest()
        digest.update(image_digest)
        digest.update(repr(captions[row]).encode())
        images.update(image_digest)
    if REPEATS_COLUMN in records.column_names:  # a renamed 10_ folder is another run
        digest.update(repr(records[REPEATS_COLUMN]).encode())
    for mask in masks or []:
        kind = mask in (None, ALPHA)
        mask_digest.update(str(mask).encode() if kind else hashlib.sha256(Path(mask).read_bytes()).digest())
    if masks is not None:
        digest.update(mask_digest.digest())
    return CheckedData(records, digest.hexdigest()[:20], problems, images.hexdigest()[:20], masks,
                       mask_digest.hexdigest()[:20] if masks is not None else "")


def check_masks(masks: list[str | None], names: list[str], dataset_name: str, reporter: Any) -> None:
    """Refuse masked_loss when no image has a mask; else say where the masks came from."""
    if not any(masks):
        raise InputError(f"masked_loss: none of the {len(masks)} images of '{dataset_name}' has a mask: no "
                         "same-named file in a masks/ folder beside it (dog.jpg -> masks/dog.png, white trains) "
                         "and no alpha channel. Add masks, or set masked_loss off.")
    reporter.info(mask_report(masks, names))


def long_captions(pipeline: Any, captions: list[str]) -> list[str]:
    """One note per text encoder whose window some captions overflow (the rest is cut off)."""
    notes = []
    distinct = sorted(set(captions))
    for attr in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tokenizer = getattr(pipeline, attr, None)
        if tokenizer is None or not distinct:
            continue
        window = min(tokenizer.model_max_length, 512)
        lengths = [len(ids) for ids in tokenizer(distinct, truncation=False).input_ids]
        over = {c for c, n in zip(distinct, lengths) if n > window}
        if over:
            count = sum(c in over for c in captions)
            notes.append(f"{count} of {len(captions)} captions are longer than {attr}'s {window} tokens "
                         f"({type(tokenizer).__name__}); the text encoder sees only their first {window} tokens.")
    return notes
