"""Model families: everything that differs between architectures, and nothing else.

Owns: the family interface (`base`), one class per family in its own file (`sd`, `sdxl`, `sd3`,
`flux`, `flux2`, `chroma`, `z_image`, `qwen_image`) with the parameters only it reads, text-encoding helpers
(`text`), and this registry, keyed by the pipeline class name in model_index.json (the names the
Lab's `model_architectures` filter uses).
May import: the ground floor (`errors`, `hub_ids`, `objectives`, `params`).
"""

from __future__ import annotations

from ..errors import InputError
from .base import ModelFamily, read_model_index
from .chroma import Chroma
from .flux import Flux
from .flux2 import MIN_DIFFUSERS, Flux2, Flux2Klein
from .qwen_image import QwenImage
from .sd import StableDiffusion
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL
from .z_image import ZImage

TRAINED = (StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux, Flux2, Flux2Klein, Chroma, ZImage, QwenImage)
FAMILIES: dict[str, type[ModelFamily]] = {
    family.pipeline_class.__name__: family for family in TRAINED
    if family.pipeline_class is not None  # the newer families need a newer diffusers than the rest
}
# Families this trainer has but the installed diffusers/transformers cannot build.
NEEDS_NEWER_LIBRARIES = {family.pipeline_class_name: family.label
                         for family in TRAINED if family.pipeline_class is None}


def family_for(source: str) -> type[ModelFamily]:
    """The family of a pipeline, from its class name, or a clear error naming what is supported."""
    class_name = read_model_index(source).get("_class_name", "<missing>")
    try:
        return FAMILIES[class_name]
    except KeyError:
        supported = ", ".join(sorted(FAMILIES))
        newer = ""
        if class_name in NEEDS_NEWER_LIBRARIES:
            needs = (f"diffusers >= {MIN_DIFFUSERS}" if class_name.startswith("Flux2")
                     else "a newer diffusers/transformers")
            newer = f" ({NEEDS_NEWER_LIBRARIES[class_name]} needs {needs}: pip install -U diffusers transformers)"
        raise InputError(f"model_name: '{source}' is a {class_name}; this trainer supports "
                         f"{supported}{newer}.") from None
