"""The registry of model families, keyed by the pipeline class name in model_index.json
(the same names the Lab's `model_architectures` filter uses)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from .base import ModelFamily
from .sd import StableDiffusion

FAMILIES: dict[str, type[ModelFamily]] = {
    family.pipeline_class.__name__: family for family in (StableDiffusion,)
}


def read_model_index(source: str) -> dict:
    """model_index.json of a local pipeline folder or a hub repo (only this small file is fetched)."""
    path = Path(source).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise InputError(f"model_name: '{source}' is a folder but has no model_index.json; it must be "
                             "a diffusers pipeline folder (as written by save_pretrained).")
    elif path.exists():
        raise InputError(f"model_name: '{source}' is a file; give the pipeline folder that holds "
                         "model_index.json, or a hub id.")
    elif source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise InputError(f"model_name: there is no folder '{source}', and it is not a hub id "
                         "('owner/name').")
    else:
        from huggingface_hub import hf_hub_download

        try:
            index = Path(hf_hub_download(source, "model_index.json"))
        except Exception as exc:  # offline, gated, or no such repo: say which and stop
            raise InputError(f"model_name: could not fetch model_index.json of '{source}' from the "
                             f"hub ({type(exc).__name__}: {exc}).") from None
    try:
        return json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"model_name: {index} is not readable JSON ({exc}).") from None


def family_for(source: str) -> type[ModelFamily]:
    """The family of a pipeline, from its class name, or a clear error naming what is supported."""
    class_name = read_model_index(source).get("_class_name", "<missing>")
    try:
        return FAMILIES[class_name]
    except KeyError:
        supported = ", ".join(sorted(FAMILIES))
        raise InputError(f"model_name: '{source}' is a {class_name}; this trainer supports "
                         f"{supported}.") from None
