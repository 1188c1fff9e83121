"""Eval images: the eval prompt drawn with the LoRA as trained so far, at a fixed seed. A stop
asked while an image is drawn ends it at the next denoising step (the image is not kept)."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from diffusers.training_utils import offload_models
from PIL import Image

from .. import atomic
from ..outputs.layout import BEFORE


@dataclass(frozen=True)
class EvalSettings:
    prompt: str  # empty: no eval images
    seed: int
    every_epochs: int  # eval_steps
    inference_steps: int
    guidance_scale: float  # 0: the pipeline's own default
    resolution: int


@contextmanager
def inference_mode(family: Any) -> Iterator[None]:
    """The denoiser and text encoders in eval mode while drawing (no adapter dropout), then as they were."""
    modules = [family.denoiser, *family.text_encoders]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, training in zip(modules, modes):
            m.train(training)


class Evaluator:
    def __init__(self, family: Any, settings: EvalSettings, out_dir: Path | None, accelerator: Any,
                 ema: Any = None, stop_asked: Any = lambda: False):
        self.family = family
        self.stop_asked = stop_asked
        self.settings = replace(settings, prompt=settings.prompt.strip())
        self.out_dir = out_dir
        self.accelerator = accelerator
        self.ema = ema
        self.images: list[Path] = []

    @property
    def enabled(self) -> bool:
        return bool(self.settings.prompt) and self.out_dir is not None

    def due(self, epoch: int) -> bool:
        return self.enabled and epoch % self.settings.every_epochs == 0

    def before(self, resumed: bool) -> None:
        """The eval prompt before the first step (`before.png`, what the end is compared with); a
        resumed run keeps its first run's."""
        if not self.enabled or not self.accelerator.is_main_process:
            return
        if not resumed:
            self.run(BEFORE, 0)
        elif (self.out_dir / f"{BEFORE}.png").is_file():
            self.images.append(self.out_dir / f"{BEFORE}.png")

    def run(self, tag: str, step: int) -> Path | None:
        """Draw the eval prompt, save `<tag>.png`, log it to the trackers, return its path."""
        if not self.enabled or not self.accelerator.is_main_process:
            return None
        image = self.draw(self.settings.prompt, self.settings.seed)
        if image is None:
            return None
        path = self.out_dir / f"{tag}.png"
        atomic.write_file(path, lambda partial: image.save(partial, format="PNG"))  # the Lab lists this folder
        self.images.append(path)
        self._log(tag, image, step)
        return path

    def _check_stop(self, pipeline: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        if self.stop_asked():
            pipeline._interrupt = True  # diffusers' pipelines skip their remaining denoising steps
        return callback_kwargs

    @torch.no_grad()
    def draw(self, prompt: str, seed: int) -> Image.Image | None:
        """The image, or None when a stop was asked meanwhile."""
        averaged = self.ema.applied() if self.ema is not None else nullcontext()
        device = self.accelerator.device
        # the VAE and text encoders wait on the CPU between evals (see setup.prepare_data)
        parked = offload_models(*self.family.frozen_modules, device=device, offload=device.type != "cpu")
        with averaged, parked, self.accelerator.autocast(), inference_mode(self.family):
            pipeline = self.family.eval_pipeline()
            generator = torch.Generator(device="cpu").manual_seed(seed)
            result = pipeline(
                prompt=prompt,
                num_inference_steps=self.settings.inference_steps,
                height=self.settings.resolution,
                width=self.settings.resolution,
                generator=generator,
                callback_on_step_end=self._check_stop,
                **self.family.eval_call_kwargs(self.settings.guidance_scale),
            )
        return None if self.stop_asked() else result.images[0]

    def _log(self, tag: str, image: Image.Image, step: int) -> None:
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image(f"eval/{self.settings.prompt}", np.asarray(image),
                                         step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"eval": [wandb.Image(image, caption=f"{tag}: {self.settings.prompt}")]}, step=step)
