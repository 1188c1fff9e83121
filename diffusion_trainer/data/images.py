"""Images: decoded upright and in RGB, their sizes read from headers, and each made into the
training tensor (resize to cover the target shape, crop, augment) with a record of the original
size and the crop it made (SDXL conditions on both); a mask goes through the same resize, flip,
crop and rotation."""

from __future__ import annotations

import io
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import transforms
from torchvision.transforms import functional as TF

INTERPOLATION = {
    "lanczos": transforms.InterpolationMode.LANCZOS,
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "bicubic": transforms.InterpolationMode.BICUBIC,
    "nearest": transforms.InterpolationMode.NEAREST,
}
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
    mask: torch.Tensor | None = None  # 1 x H x W in [0, 1] (1 trains), when a mask came in


def covering_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of `size` scaled so that it just covers `target` (both (height, width))."""
    scale = max(target[0] / size[0], target[1] / size[1])
    return max(target[0], round(size[0] * scale)), max(target[1], round(size[1] * scale))


def _on(mask: Image.Image | None, step: Any, *args: Any, **kwargs: Any) -> Image.Image | None:
    return None if mask is None else step(mask, *args, **kwargs)


@dataclass(frozen=True)
class Augmentation:
    """How each image is resized, cropped and augmented: the parameters of the same names."""

    resolution: int
    image_interpolation_mode: str
    center_crop: bool
    random_flip: bool
    color_jitter: bool
    color_jitter_brightness: float
    color_jitter_contrast: float
    color_jitter_saturation: float
    color_jitter_hue: float
    random_rotation: bool
    rotation_degrees: float
    rotation_prob: float

    @classmethod
    def of(cls, values: Any) -> "Augmentation":
        """From anything with these attributes (the run's parameters)."""
        return cls(**{f.name: getattr(values, f.name) for f in fields(cls)})


class ImageTransform:
    """Resize to cover the target shape, crop to it, then the optional augmentations."""

    def __init__(self, augmentation: Augmentation):
        a = augmentation
        self.augmentation = a
        self.size = a.resolution
        self.interpolation = INTERPOLATION[a.image_interpolation_mode]
        self.center_crop = a.center_crop
        self.flip = a.random_flip
        self.jitter = transforms.ColorJitter(
            brightness=a.color_jitter_brightness, contrast=a.color_jitter_contrast,
            saturation=a.color_jitter_saturation, hue=a.color_jitter_hue,
        ) if a.color_jitter else None
        self.rotation = transforms.RandomRotation(a.rotation_degrees) if a.random_rotation else None
        self.rotation_prob = a.rotation_prob

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
                 flip: bool | None = None, mask: Image.Image | None = None) -> Transformed:
        """`flip` None draws it (when random_flip is on); True/False forces it (cached variants).
        `mask` (8-bit gray, the image's size) is resized, flipped, cropped and rotated with it;
        what a rotation brings in from outside the picture does not train."""
        target = target or (self.size, self.size)
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)  # torch.manual_seed would reseed CUDA too
            original_size = (image.height, image.width)
            resized = covering_size(original_size, target)
            image = TF.resize(image, list(resized), interpolation=self.interpolation)
            mask = _on(mask, TF.resize, list(resized), interpolation=transforms.InterpolationMode.BILINEAR)
            drawn = bool(self.flip and torch.rand(()) < 0.5)
            flipped = drawn if flip is None else flip
            if flipped:
                image, mask = TF.hflip(image), _on(mask, TF.hflip)
            if self.center_crop:
                top = round((resized[0] - target[0]) / 2)
                left = round((resized[1] - target[1]) / 2)
            else:
                top, left, _, _ = transforms.RandomCrop.get_params(image, target)
            image = TF.crop(image, top, left, target[0], target[1])
            mask = _on(mask, TF.crop, top, left, target[0], target[1])
            if self.jitter is not None:
                image = self.jitter(image)
            if self.rotation is not None and torch.rand(()) < self.rotation_prob:
                r = self.rotation  # RandomRotation's own steps, so that the mask turns by the same angle
                angle = r.get_params(r.degrees)
                image = TF.rotate(image, angle, r.interpolation, r.expand, r.center, r.fill)
                mask = _on(mask, TF.rotate, angle, transforms.InterpolationMode.BILINEAR, r.expand, r.center, 0)
            pixels = TF.normalize(TF.to_tensor(image), [0.5], [0.5])
        return Transformed(pixels, original_size, (top, left), flipped, None if mask is None else TF.to_tensor(mask))
