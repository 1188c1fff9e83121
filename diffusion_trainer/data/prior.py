"""Prior preservation (DreamBooth): the class-image folder's checks, and samples that pair each
instance image with a class image so a batch holds both (diffusers' DreamBooth scripts concatenate
the two halves and split the loss).

An epoch stays the instance data's: instance sample i of epoch e is paired with class sample
(rank + (e - 1) x n) mod m of its bucket's pool (rank: i's place among the n instance images of
its bucket; m: the pool's size), so class images are used in turn across epochs, the pairing is a
pure function of (epoch, index) (exact resume, disjoint shares across processes) and every batch
stays of one shape. A pool holds the class images whose own aspect-ratio bucket is the instance
bucket; when none is, all class images, cropped to that bucket's shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from .sources import IMAGE_SUFFIXES, listed_files

# Names the generated class images take (index from 0); any other image in the folder counts too.
GENERATED_NAME = "class_{:05d}.png"


def check_class_folder(class_data_dir: str, dataset_dir: Path | None, output_folders: tuple[Path, ...]) -> Path:
    """The class folder, refused (InputError naming class_data_dir) when it is a file, the dataset
    folder, inside it or holding it, or one of the run's own output folders."""
    folder = Path(class_data_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise InputError(f"class_data_dir: '{class_data_dir}' is a file; give a folder of class images "
                         "(it is created when missing).")
    resolved = folder.resolve()
    if dataset_dir is not None:
        data = dataset_dir.resolve()
        if resolved == data or resolved.is_relative_to(data):
            raise InputError(f"class_data_dir: '{class_data_dir}' is {'the dataset folder' if resolved == data else 'inside the dataset folder'} "
                             f"'{dataset_dir}': its images would be trained as instance images too. Put the class "
                             "images in a folder of their own, outside the dataset folder.")
        if data.is_relative_to(resolved):
            raise InputError(f"class_data_dir: '{class_data_dir}' holds the dataset folder '{dataset_dir}'; "
                             "give a folder of class images only, outside the dataset folder.")
    for output in output_folders:
        out = Path(output).expanduser().resolve()
        if resolved == out or resolved.is_relative_to(out):
            raise InputError(f"class_data_dir: '{class_data_dir}' lies in the run's output folder '{output}'; "
                             "give a folder of class images outside it.")
    return folder


def plain_image_folder(folder: Path) -> bool:
    """Whether generated images can be added to `folder`: a folder of images read as files (no
    metadata.jsonl/.csv and no saved dataset, which list their images themselves)."""
    from .sources import _metadata_files

    if not folder.is_dir():
        return True
    listed = (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()
    return not listed and not _metadata_files(folder)


def count_class_images(folder: Path) -> int:
    """The images a plain class folder holds (hidden files left out, as the source reader does)."""
    if not folder.is_dir():
        return 0
    return sum(p.suffix.lower() in IMAGE_SUFFIXES for p in listed_files(folder))


def missing_names(folder: Path, wanted: int) -> list[Path]:
    """Where the images still missing from `wanted` go: GENERATED_NAME paths not yet written, in
    index order, as many as the folder lacks. An interrupted generation resumes at the first gap."""
    missing = wanted - count_class_images(folder)
    names: list[Path] = []
    index = 0
    while len(names) < missing:
        path = folder / GENERATED_NAME.format(index)
        if not path.exists():
            names.append(path)
        index += 1
    return names


def class_pools(instance_targets: list[tuple[int, int]],
                class_targets: list[tuple[int, int]]) -> dict[tuple[int, int], list[tuple[int, tuple[int, int]]]]:
    """Per instance bucket shape, its pool of (class image, shape to train it at)."""
    pools = {}
    for shape in dict.fromkeys(tuple(t) for t in instance_targets):
        same = [j for j, t in enumerate(class_targets) if tuple(t) == shape]
        pools[shape] = [(j, shape) for j in (same or range(len(class_targets)))]
    return pools


class PairedSamples(torch.utils.data.Dataset):
    """Instance items, each with its class partner under "class"; the epoch and targets are the
    instance data's, so the batch sampler and the step plan see the instance data alone.
    `class_samples` is indexed by slot: the pools' (class image, shape) pairs laid end to end."""

    def __init__(self, instance: Any, class_samples: Any, slots: dict[tuple[int, int], list[int]]):
        self.instance = instance
        self.class_samples = class_samples
        self.targets = instance.targets
        self.captions = instance.captions
        self.epoch = 0
        self._pool_of: list[tuple[list[int], int, int]] = []  # per instance index: (pool slots, rank, bucket size)
        ranks: dict[tuple[int, int], int] = {}
        sizes = {shape: sum(tuple(t) == shape for t in self.targets) for shape in slots}
        for target in self.targets:
            shape = tuple(target)
            self._pool_of.append((slots[shape], ranks.get(shape, 0), sizes[shape]))
            ranks[shape] = ranks.get(shape, 0) + 1

    @property
    def image_captions(self) -> list[str]:  # per image (repeats aside), for the adapter's tags
        return self.instance.image_captions

    @property
    def image_count(self) -> int:
        return self.instance.image_count

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.instance.set_epoch(epoch)
        self.class_samples.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.instance)

    def partner(self, index: int) -> int:
        """The class slot paired with instance sample `index` this epoch."""
        pool, rank, size = self._pool_of[index]
        return pool[(rank + max(0, self.epoch - 1) * size) % len(pool)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.instance[index], "class": self.class_samples[self.partner(index)]}


def merged(batch: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """(the batch with its class half appended, how many rows are instance rows); a batch
    without class samples comes back as it is, with None. With masked_loss the class images, which
    have no masks, train on the whole image."""
    prior = batch.get("class")
    if prior is None:
        return batch, None
    rows = len(batch["caption"])
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if key == "class":
            continue
        other = prior[key] if key != "mask" else torch.ones_like(value[:1]).expand(len(prior["caption"]), *value.shape[1:])
        out[key] = torch.cat([value, other]) if isinstance(value, torch.Tensor) else [*value, *other]
    return out, rows

