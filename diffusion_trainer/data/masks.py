"""Masks for masked_loss: where each image trains (white) and where it does not (black). A mask is
a same-named image in a `masks/` folder beside the image (`dog.jpg` -> `masks/dog.png`), else the
image's alpha channel (opaque trains). The data check finds and checks them (`find_masks`); the
transform carries them through every crop, flip and rotation (images.ImageTransform)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from .kohya import MASKS_FOLDER
from .sources import IMAGE_SUFFIXES

ALPHA = ":alpha:"  # the mask is the image's own alpha channel
ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info)


class MaskFiles:
    """The mask files beside images, each `masks/` folder listed once."""

    def __init__(self):
        self.listed: dict[Path, dict[str, list[Path]]] = {}

    def of(self, image: Path) -> list[Path]:
        """The files in `masks/` beside `image` with its stem (any image extension, any case)."""
        folder = image.parent / MASKS_FOLDER
        if folder not in self.listed:
            by_stem: dict[str, list[Path]] = {}
            if folder.is_dir():
                for file in sorted(folder.iterdir()):
                    if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES and not file.name.startswith("."):
                        by_stem.setdefault(file.stem, []).append(file)
            self.listed[folder] = by_stem
        return self.listed[folder].get(image.stem, [])


def upright_size(data: bytes) -> tuple[int, int]:
    """(height, width) of an image file as it will be used: decoded and turned upright."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        upright = ImageOps.exif_transpose(image)
        return upright.height, upright.width


def find_mask(name: str, data: bytes, size: tuple[int, int], files: MaskFiles) -> tuple[str | None, str | None]:
    """(the mask of the image `name` (a path, or ALPHA), None) or (None, why its mask cannot be
    used); (None, None) when it has none. `size`: the image's upright (height, width)."""
    path = Path(name)
    candidates = files.of(path) if path.is_file() else []
    if len(candidates) > 1:
        return None, f"has {len(candidates)} masks ({', '.join(p.name for p in candidates)}); keep one"
    if candidates:
        mask = candidates[0]
        try:
            mask_size = upright_size(mask.read_bytes())
        except Exception as exc:  # unreadable, truncated, not an image
            return None, f"its mask {mask} cannot be decoded ({type(exc).__name__}: {exc})"
        if mask_size != size:
            return None, (f"its mask {mask} is {mask_size[1]}x{mask_size[0]}, the image {size[1]}x{size[0]} "
                          "(width x height); a mask must have its image's size")
        return str(mask), None
    with Image.open(io.BytesIO(data)) as image:
        return (ALPHA if has_alpha(image) else None), None


def mask_image(source: str | None, image: Any, size: tuple[int, int]) -> Image.Image:
    """The mask as an upright 8-bit gray image (255 trains): from its file, from the alpha channel
    of `image` (the image as the dataset holds it), or all white (None). `size`: (height, width)."""
    if source is None:
        return Image.new("L", (size[1], size[0]), 255)
    if source == ALPHA:
        return ImageOps.exif_transpose(image).convert("RGBA").getchannel("A")
    with Image.open(source) as mask:
        return ImageOps.exif_transpose(mask).convert("L")


def mask_report(sources: list[str | None], names: list[str], listed: int = 20) -> str:
    """One note: how many masks came from files and alpha channels, and which images have none."""
    files = sum(s not in (None, ALPHA) for s in sources)
    alpha = sum(s == ALPHA for s in sources)
    found = [f"{files} from {MASKS_FOLDER}/ files"] * bool(files) + [f"{alpha} from alpha channels"] * bool(alpha)
    without = [n for n, s in zip(names, sources) if s is None]
    note = f"masked_loss: masks for {len(sources) - len(without)} of {len(sources)} images ({', '.join(found)})"
    if not without:
        return note + "."
    more = f", ... and {len(without) - listed} more" if len(without) > listed else ""
    return (note + f"; {len(without)} have none and train on the whole image: "
            + ", ".join(Path(n).name for n in without[:listed]) + more + ".")
