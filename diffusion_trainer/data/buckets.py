"""Aspect-ratio buckets, and the sampler that makes each epoch an exact plan of full batches of
one shape, dealt out to the processes."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..seeds import derived_seed

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
        generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
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
