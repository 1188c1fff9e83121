"""The class images prior preservation lacks, drawn with the base model (before the LoRA is
attached) by the family's own pipeline, as diffusers' DreamBooth scripts do before training.

Each image is seeded from (seed, its index) and written atomically under its own name, so an
interrupted generation leaves only whole images and the next run draws just the rest, the same
images an uninterrupted run would have drawn. They stay in the folder for later runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .. import atomic
from ..errors import raise_if_stopped
from ..seeds import derived_seed

CLASS_IMAGE_NAMESPACE = 2_000_000  # class images' seeds never coincide with an epoch's or a cached variant's
GENERATE_BATCH = 4  # diffusers' sample_batch_size


@dataclass(frozen=True)
class DrawSettings:
    prompt: str
    seed: int
    inference_steps: int
    guidance_scale: float  # 0: the pipeline's own default
    resolution: int


def image_index(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[1])


@torch.no_grad()
def generate_class_images(family: Any, paths: list[Path], settings: DrawSettings, device: torch.device,
                          reporter: Any, stop_asked: Callable[[], bool] = lambda: False) -> None:
    """Draw one image per path (its index in the name decides its seed), a few per pipeline call."""
    if not paths:
        return
    started = time.monotonic()
    reporter.info(f"Prior preservation: drawing {len(paths)} class image(s) of '{settings.prompt}' with the base "
                  f"model ({settings.resolution}x{settings.resolution}, {settings.inference_steps} steps) into "
                  f"{paths[0].parent}.")
    pipeline = family.pipeline
    pipeline.set_progress_bar_config(disable=True)
    done = 0
    for start in range(0, len(paths), GENERATE_BATCH):
        raise_if_stopped(stop_asked, "while class images were drawn")
        chunk = paths[start:start + GENERATE_BATCH]
        generators = [torch.Generator(device="cpu").manual_seed(derived_seed(settings.seed, CLASS_IMAGE_NAMESPACE,
                                                                             image_index(p))) for p in chunk]
        images = pipeline(prompt=[settings.prompt] * len(chunk), num_inference_steps=settings.inference_steps,
                          height=settings.resolution, width=settings.resolution, generator=generators,
                          **family.eval_call_kwargs(settings.guidance_scale)).images
        for path, image in zip(chunk, images):
            atomic.write_file(path, lambda partial, image=image: image.save(partial, format="PNG"))
        done += len(chunk)
        elapsed = time.monotonic() - started
        reporter.info(f"Class images: {done}/{len(paths)} drawn ({elapsed:.0f} s"
                      f"{f', about {elapsed / done * (len(paths) - done):.0f} s left' if done < len(paths) else ''}).")
