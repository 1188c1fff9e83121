"""Captions: which caption file (.txt or .caption) belongs to which image, the trigger word, caption dropout,
shuffling and dropping a caption's tags."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch


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


def shuffled_tags(caption: str, keep: int = 0, trigger_word: str = "", drop_rate: float = 0.0,
                  shuffle: bool = True, generator: torch.Generator | None = None) -> str:
    """The caption's comma-separated tags, the ones after the first `keep` shuffled (when `shuffle`)
    and each of those dropped with probability `drop_rate`, drawn from `generator` (torch's seeded
    RNG when None). A caption that starts with the trigger word (as `with_trigger` makes it) keeps
    it first, whatever follows it; `keep` counts the tags after it."""
    prefix, rest = "", caption
    trigger = trigger_word.strip()
    if trigger and re.match(rf"{re.escape(trigger)}(?!\w)", caption):
        rest = caption[len(trigger):]
        separator = re.match(r"[\s,]*", rest).group(0)
        prefix, rest = trigger + separator, rest[len(separator):]
    tags = [t.strip() for t in rest.split(",")]
    tags = [t for t in tags if t]
    kept, free = tags[:keep], tags[keep:]
    if not free:
        return caption
    if shuffle and len(free) > 1:
        free = [free[i] for i in torch.randperm(len(free), generator=generator).tolist()]
    if drop_rate > 0:
        stays = (torch.rand(len(free), generator=generator) >= drop_rate).tolist()
        free = [t for t, s in zip(free, stays) if s]
    body = ", ".join(kept + free)
    return prefix + body if body else prefix.rstrip(", \t\n")



CAPTION_EXTENSIONS = (".txt", ".caption")  # kohya's scripts read .caption files


def caption_files(images: list[Path], files: list[Path], problems: list[str],
                  extension: str = ".txt") -> tuple[dict[Path, Path], set[Path]]:
    """({image: its caption}, the images refused): the caption is the file with `extension` (`.txt`
    or `.caption`) beside the image with the same stem, its extension in any case (`B.JPG` +
    `B.TXT`); files with the other extension are not captions. Images that would share one
    caption (`a.png`, `a.jpg` and `a.txt`), or whose caption is ambiguous (`a.txt` and `a.TXT`),
    are refused, each case described in `problems`."""
    extension = extension.lower()
    by_stem: dict[tuple[Path, str], list[Path]] = {}
    for file in files:
        if file.suffix.lower() == extension:
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
