"""The training dataset: each item an image (as pixels, or cached latents) with its caption,
original size, crop and target shape, and with masked_loss its mask. An image repeated (its
kohya-style folder's repeats, times dataset_repeats) is that many samples of an epoch. Each
sample's transform is seeded from (seed, epoch, sample), so a repeat is a new draw of the
augmentation and a run is repeatable whatever the worker count."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from ..seeds import derived_seed
from .buckets import bucket_targets
from .captions import caption_text, with_trigger
from .images import Augmentation, ImageTransform, to_rgb, upright_sizes
from .masks import mask_image
from .sources import row_repeats


def sample_draws(repeats: list[int]) -> list[tuple[int, int]]:
    """(image, repeat) of each sample: every image's first draw first, in the images' order (so
    without repeats sample k is image k), then the second draws of the images repeated, and so on."""
    most = max(repeats, default=0)
    return [(image, k) for k in range(most) for image, count in enumerate(repeats) if k < count]


class TrainingSamples(torch.utils.data.Dataset):
    """Each item: index (the sample's), pixel_values, caption (trigger word in), original_size,
    crop_top_left, target_size, and `mask` (1 x H x W) when masks are given. `captions`,
    `targets`: per image; `repeats`: each image's samples an epoch; `masks`: each image's mask
    source (masks.py), or None for no masked loss."""

    def __init__(self, records, image_column: str, captions: list[str], transform: ImageTransform,
                 seed: int, targets: list[tuple[int, int]] | None = None, repeats: list[int] | None = None,
                 masks: list[str | None] | None = None):
        self.records = records
        self.image_column = image_column
        self.image_captions = captions
        self.transform = transform
        self.seed = seed
        self.image_targets = targets or [(transform.size, transform.size)] * len(records)
        self.repeats = repeats or [1] * len(records)
        self.masks = masks
        self.draws = sample_draws(self.repeats)
        self.captions = [self.image_captions[image] for image, _ in self.draws]  # per sample, as trained
        self.targets = [self.image_targets[image] for image, _ in self.draws]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.draws)

    @property
    def image_count(self) -> int:
        return len(self.records)

    def image_and_mask(self, image: int) -> tuple[Image.Image, Image.Image | None]:
        """Image `image` (not sample) upright in RGB, and its mask when masks are given."""
        raw = self.records[image][self.image_column]
        rgb = to_rgb(raw)
        mask = None if self.masks is None else mask_image(self.masks[image], raw, (rgb.height, rgb.width))
        return rgb, mask

    def image(self, image: int) -> Image.Image:
        return self.image_and_mask(image)[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, _ = self.draws[index]
        pixels, mask = self.image_and_mask(image)
        target = self.image_targets[image]
        out = self.transform(pixels, derived_seed(self.seed, self.epoch, index), target, mask=mask)
        extra = {} if out.mask is None else {"mask": out.mask}
        return training_item(index, self.image_captions[image], out.original_size, out.crop_top_left, target,
                             pixel_values=out.pixels, **extra)


def training_item(index: int, caption: str, original_size: tuple[int, int], crop_top_left: tuple[int, int],
                  target_size: tuple[int, int], **image: torch.Tensor) -> dict[str, Any]:
    """One dataset item, whether its image comes as pixels or as cached latent parameters."""
    return {"index": index, "caption": caption, "original_size": torch.tensor(original_size),
            "crop_top_left": torch.tensor(crop_top_left), "target_size": torch.tensor(target_size), **image}


def build_samples(records: Any, image_column: str, caption_column: str, trigger_word: str,
                  augmentation: Augmentation, seed: int, bucketing: bool, dataset_repeats: int = 1,
                  masks: list[str | None] | None = None) -> TrainingSamples:
    """The dataset's samples: captions with the trigger word, each image's target shape (its
    aspect-ratio bucket, or the square resolution), its repeats (its folder's, times
    `dataset_repeats`) and, for masked_loss, its mask source (data.check found them)."""
    captions = [with_trigger(caption_text(c), trigger_word) for c in records[caption_column]]
    targets = bucket_targets(upright_sizes(records, image_column), augmentation.resolution) if bucketing else None
    repeats = [r * dataset_repeats for r in row_repeats(records)]
    return TrainingSamples(records, image_column, captions, ImageTransform(augmentation), seed, targets, repeats,
                           masks)
