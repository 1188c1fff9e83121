"""The training dataset: each item an image (as pixels, or cached latents) with its caption,
original size, crop and target shape. Each sample's transform is seeded from (seed, epoch,
index), so a run is repeatable whatever the worker count."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from ..seeds import derived_seed
from .buckets import bucket_targets
from .captions import caption_text, with_trigger
from .images import Augmentation, ImageTransform, to_rgb, upright_sizes


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
        out = self.transform(self.image(index), derived_seed(self.seed, self.epoch, index), self.targets[index])
        return training_item(index, self.captions[index], out.original_size, out.crop_top_left,
                             self.targets[index], pixel_values=out.pixels)


def training_item(index: int, caption: str, original_size: tuple[int, int], crop_top_left: tuple[int, int],
                  target_size: tuple[int, int], **image: torch.Tensor) -> dict[str, Any]:
    """One dataset item, whether its image comes as pixels or as cached latent parameters."""
    return {"index": index, "caption": caption, "original_size": torch.tensor(original_size),
            "crop_top_left": torch.tensor(crop_top_left), "target_size": torch.tensor(target_size), **image}



def build_samples(records: Any, image_column: str, caption_column: str, trigger_word: str,
                  augmentation: Augmentation, seed: int, bucketing: bool) -> TrainingSamples:
    """The dataset's samples: captions with the trigger word, each image's target shape (its
    aspect-ratio bucket, or the square resolution)."""
    captions = [with_trigger(caption_text(c), trigger_word) for c in records[caption_column]]
    targets = bucket_targets(upright_sizes(records, image_column), augmentation.resolution) if bucketing else None
    return TrainingSamples(records, image_column, captions, ImageTransform(augmentation), seed, targets)
