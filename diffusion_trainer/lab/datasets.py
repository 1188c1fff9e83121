"""Datasets the Lab knows by name, resolved before the run starts: the run itself reads only
folders and hub ids."""

from __future__ import annotations

import json
from pathlib import Path


def resolve_dataset_name(dataset_name: str, datasets_dir: Path) -> str:
    """`dataset_name` as the run will read it. A name that is no folder here but is one under the
    workspace's `datasets/` is that folder; a folder where the Lab only indexed a hub dataset (it
    holds nothing but the Lab's index.json) is that dataset's hub id. Anything else as it is."""
    if Path(dataset_name).expanduser().exists() or not (datasets_dir / dataset_name).is_dir():
        return dataset_name
    folder = datasets_dir / dataset_name
    return hub_dataset_id(folder) or str(folder)


def hub_dataset_id(folder: Path) -> str | None:
    """The hub id of a Lab dataset folder holding only the Lab's index.json, else None."""
    if [p.name for p in folder.iterdir() if not p.name.startswith(".")] != ["index.json"]:
        return None
    try:
        entry = json.loads((folder / "index.json").read_text())
    except (OSError, ValueError):
        return None
    dataset_id = entry.get("dataset_id") if isinstance(entry, dict) else None
    return str(dataset_id) if dataset_id else None
