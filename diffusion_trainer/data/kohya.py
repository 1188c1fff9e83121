"""kohya-style dataset folders: subfolders named `<repeats>_<name>` (`10_sks dog/`), whose images
train `<repeats>` times an epoch and whose `<name>` captions their images without a caption file.
A folder is read this way when one of its subfolders is named so; then every subfolder holding
images must be (a `masks/` folder holds masks, not training images)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

NAMED = re.compile(r"^(\d+)_(.*)$")
MAX_REPEATS = 10_000
MASKS_FOLDER = "masks"  # masks beside the images (data/masks.py), never training images


@dataclass(frozen=True)
class KohyaFolder:
    repeats: int
    name: str  # the caption of its images without a caption file


def is_mask(file: Path, root: Path) -> bool:
    """Whether `file` lies in a `masks/` folder under `root`."""
    return MASKS_FOLDER in (part.lower() for part in file.relative_to(root).parts[:-1])


def kohya_folders(root: Path, images: list[Path]) -> dict[Path, KohyaFolder]:
    """{subfolder: its repeats and name} when `root` is a kohya-style folder, else {}. Every
    subfolder holding images must then be named `<repeats>_<name>` with repeats 1 to MAX_REPEATS
    and a name; all that are not are refused at once (InputError)."""
    holding = sorted({root / image.relative_to(root).parts[0] for image in images
                      if len(image.relative_to(root).parts) > 1})
    if not any(NAMED.match(folder.name) for folder in holding):
        return {}
    found, bad = {}, []
    for folder in holding:
        match = NAMED.match(folder.name)
        if match is None:
            bad.append(f"'{folder.name}' is not named <repeats>_<name>")
        elif not 1 <= int(match.group(1)) <= MAX_REPEATS:
            bad.append(f"'{folder.name}' asks for {int(match.group(1))} repeats (1 to {MAX_REPEATS})")
        elif not match.group(2).strip():
            bad.append(f"'{folder.name}' has no name after the repeats (it captions the images without a "
                       "caption file)")
        else:
            found[folder] = KohyaFolder(int(match.group(1)), match.group(2).strip())
    if bad:
        raise InputError(f"dataset_name: '{root}' is a kohya-style folder (subfolders named <repeats>_<name>, "
                         f"e.g. '10_sks dog'), but {len(bad)} of its image subfolders cannot be read so:\n  "
                         + "\n  ".join(bad) + "\n  Rename them ('10_sks dog': 10 repeats, and 'sks dog' captions "
                         "its images without a caption file), or move them out of the folder.")
    return found


def folder_of(image: Path, root: Path, folders: dict[Path, KohyaFolder]) -> KohyaFolder | None:
    """The kohya folder `image` lies in (None: directly in `root`, or not a kohya-style folder)."""
    parts = image.relative_to(root).parts
    return folders.get(root / parts[0]) if len(parts) > 1 else None


def describe(folders: dict[Path, KohyaFolder], counts: dict[Path, int], top_level: int) -> str:
    """One line: each folder's images and repeats, and the samples they make an epoch."""
    parts = [f"{folder.name} ({counts.get(folder, 0)} x {k.repeats})" for folder, k in folders.items()]
    if top_level:
        parts.append(f"the folder itself ({top_level} x 1)")
    samples = sum(counts.get(f, 0) * k.repeats for f, k in folders.items()) + top_level
    return f"kohya-style folders (images x repeats): {', '.join(parts)}: {samples} samples an epoch."
