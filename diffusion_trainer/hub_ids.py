"""Telling a local path from a hub id ('owner/name', or a bare 'name' for datasets), for a name
that is no file or folder here: the one rule for model_name and dataset_name.

Ground floor: imports nothing of the package.
"""

from __future__ import annotations


def names_a_path(name: str) -> bool:
    """True when `name` can only mean a local path: it starts with '.', '/' or '~', or has more than one '/'."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1
