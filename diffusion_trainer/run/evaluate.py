"""Evaluation: the eval prompts drawn with the LoRA as trained so far, each at fixed seeds, one grid
per eval, and the validation loss. A stop asked while an image is drawn ends it at the next
denoising step (that eval's images are not kept)."""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from diffusers.training_utils import offload_models
from PIL import Image

from .. import atomic
from ..outputs.figures import eval_grid
from ..outputs.layout import BEFORE, NO_EMA

METRICS_NAME = "metrics.json"


def parse_prompts(text: str) -> tuple[str, ...]:
    """eval_prompt as prompts: with a line break, one per line ('|' kept as written); else split at '|'."""
    text = text.strip()
    parts = text.splitlines() if "\n" in text else text.split("|")
    return tuple(p.strip() for p in parts if p.strip())


@dataclass(frozen=True)
class EvalSettings:
    prompts: tuple[str, ...]  # empty: no eval images
    seed: int
    every_epochs: int  # eval_steps
    inference_steps: int
    guidance_scale: float  # 0: the pipeline's own default
    resolution: int
    num_images: int = 1  # seeds per prompt: seed, seed + 1, ...
    every_steps: int = 0  # eval_every_n_steps; 0: off
    also_without_ema: bool = False

    @property
    def seeds(self) -> list[int]:
        return [self.seed + k for k in range(self.num_images)]


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


def encode_key(args: tuple, kwargs: dict[str, Any]) -> str:
    """An encode_prompt call by what it encodes (prompts, negative prompts, guidance…), not its device."""
    return repr([a for a in args if not isinstance(a, (torch.Tensor, torch.device))]
                + sorted((k, repr(v)) for k, v in kwargs.items()
                         if k != "device" and not isinstance(v, torch.Tensor)))


def on_device(value: Any, device: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(on_device(v, device) for v in value)
    return value


class RecordedPrompts:
    """The eval prompts as the pipeline's own encode_prompt encodes them in an eval call, recorded while
    the text encoders are loaded (staged loading frees them before the denoiser loads) and handed back to
    the same calls at each eval."""

    def __init__(self) -> None:
        self.results: dict[str, Any] = {}

    @torch.no_grad()
    def record(self, family: Any, calls: list[dict[str, Any]], accelerator: Any) -> None:
        """Run each eval call up to the denoiser (which is not loaded yet: a config-only stand-in, see
        families/base.py), keeping what encode_prompt returned."""
        from ..families.base import DenoiserNotLoaded

        pipeline = family.pipeline
        real = pipeline.encode_prompt

        def recording(*args: Any, **kwargs: Any) -> Any:
            result = real(*args, **kwargs)
            self.results[encode_key(args, kwargs)] = on_device(result, "cpu")
            return result

        pipeline.__dict__["encode_prompt"] = recording
        try:
            for call in calls:
                stand_in = family.denoiser_config_only() if family.denoiser_loaded else nullcontext()
                with stand_in, accelerator.autocast():
                    try:
                        pipeline(**call)
                    except DenoiserNotLoaded:
                        pass  # encode_prompt was called before the denoiser would have been
        finally:
            del pipeline.__dict__["encode_prompt"]

    @contextmanager
    def replaying(self, pipeline: Any, device: Any) -> Iterator[None]:
        def replay(*args: Any, **kwargs: Any) -> Any:
            key = encode_key(args, kwargs)
            if key not in self.results:
                raise RuntimeError(f"an eval call encoded a prompt not recorded before the text encoders were "
                                   f"freed: {key}")
            return on_device(self.results[key], device)

        pipeline.__dict__["encode_prompt"] = replay
        try:
            yield
        finally:
            del pipeline.__dict__["encode_prompt"]


class Evaluator:
    """Evaluates before step 1, every `every_epochs` epochs, every `every_steps` steps and at the end:
    `<tag>.png` is the grid of prompts (rows) x seeds (columns), the image itself for one prompt at one
    seed; with several, each is also `<tag>_p<prompt>_s<seed>.png`. The validation loss (when a
    `validation.Validation` is given) is logged as val/loss and kept in `validation_history`."""

    def __init__(self, family: Any, settings: EvalSettings, out_dir: Path | None, accelerator: Any,
                 ema: Any = None, stop_asked: Any = lambda: False, validation: Any = None,
                 metrics_path: Path | None = None, reporter: Any = None, validates: bool = False,
                 recorded: RecordedPrompts | None = None):
        self.family = family
        self.recorded = recorded  # the eval prompts, encoded before the text encoders were freed
        self.stop_asked = stop_asked
        self.settings = settings
        self.out_dir = out_dir
        self.accelerator = accelerator
        self.ema = ema
        self.validation = validation  # on the main process; `validates`: on every process, whether one runs
        self.validates = validates or validation is not None
        self.metrics_path = metrics_path
        self.reporter = reporter
        self.images: list[Path] = []  # one grid per eval (the EMA one with use_ema)
        self.extra_grids: list[Path] = []  # the grids without EMA
        self.validation_history: list[tuple[int, dict[str, float]]] = []

    @property
    def draws_images(self) -> bool:
        return bool(self.settings.prompts) and self.out_dir is not None

    @property
    def enabled(self) -> bool:
        return self.draws_images or self.validates

    def due(self, epoch: int) -> bool:
        return self.enabled and epoch % self.settings.every_epochs == 0

    def due_at_step(self, step: int) -> bool:
        return self.enabled and self.settings.every_steps > 0 and step % self.settings.every_steps == 0

    def before(self, resumed: bool, step: int = 0) -> None:
        """The eval before the first step (`before.png`, what the end is compared with); a resumed run
        keeps its first run's, and the validation losses it measured up to `step`."""
        if not self.enabled or not self.accelerator.is_main_process:
            return
        if not resumed:
            self.run(BEFORE, 0)
            return
        if self.draws_images and (self.out_dir / f"{BEFORE}.png").is_file():
            self.images.append(self.out_dir / f"{BEFORE}.png")
        self.validation_history = [(s, v) for s, v in earlier_validation(self.metrics_path) if s <= step]

    def run(self, tag: str, step: int) -> Path | None:
        """One eval: the images and their grid, logged to the trackers, and the validation loss.
        Returns the grid's path."""
        if not self.enabled or not self.accelerator.is_main_process:
            return None
        grid = None
        if self.draws_images:
            grid = self._images(tag, step, averaged=True)
            if grid is None:
                return None  # stopped meanwhile
            self.images.append(grid)
            if self.ema is not None and self.settings.also_without_ema and tag != BEFORE:
                extra = self._images(tag + NO_EMA, step, averaged=False)
                if extra is None:
                    return grid
                self.extra_grids.append(extra)
        if self.validation is not None and not self.stop_asked():
            self._validate(step)
        return grid

    def _images(self, tag: str, step: int, averaged: bool) -> Path | None:
        prompts, seeds = self.settings.prompts, self.settings.seeds
        rows = []
        for prompt in prompts:
            row = []
            for seed in seeds:
                image = self.draw(prompt, seed, averaged)
                if image is None:
                    return None
                row.append(image)
            rows.append(row)
        if len(prompts) * len(seeds) > 1:
            for p, row in enumerate(rows, 1):
                for seed, image in zip(seeds, row):
                    self._save(self.out_dir / f"{tag}_p{p}_s{seed}.png", image)
        grid = eval_grid(rows, list(prompts), seeds)
        path = self._save(self.out_dir / f"{tag}.png", grid)  # the Lab lists this folder
        self._log(tag, grid, step)
        return path

    @staticmethod
    def _save(path: Path, image: Image.Image) -> Path:
        atomic.write_file(path, lambda partial: image.save(partial, format="PNG"))
        return path

    def _validate(self, step: int) -> None:
        losses = self.validation.losses()
        self.validation_history.append((step, losses))
        self.accelerator.log(losses, step=step)
        if self.reporter is not None:
            ranges = ", ".join(f"{k.removeprefix('val/loss_')} {v:.4g}" for k, v in losses.items() if k != "val/loss")
            self.reporter.info(f"Validation loss at step {step}: {losses['val/loss']:.5g} ({ranges}).")

    def _check_stop(self, pipeline: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        if self.stop_asked():
            pipeline._interrupt = True  # diffusers' pipelines skip their remaining denoising steps
        return callback_kwargs

    @torch.no_grad()
    def draw(self, prompt: str, seed: int, averaged: bool = True) -> Image.Image | None:
        """The image, or None when a stop was asked meanwhile."""
        weights = self.ema.applied() if self.ema is not None and averaged else nullcontext()
        device = self.accelerator.device
        # the VAE and text encoders wait on the CPU between evals (see setup.prepare_data)
        parked = offload_models(*self.family.frozen_modules, device=device, offload=device.type != "cpu")
        pipeline = self.family.eval_pipeline()
        encoded = self.recorded.replaying(pipeline, device) if self.recorded is not None else nullcontext()
        with weights, parked, encoded, self.accelerator.autocast(), inference_mode(self.family):
            result = pipeline(**eval_call(self.family, self.settings, prompt, seed),
                              callback_on_step_end=self._check_stop)
        return None if self.stop_asked() else result.images[0]

    def _log(self, tag: str, grid: Image.Image, step: int) -> None:
        name = "eval/grid" + (NO_EMA if tag.endswith(NO_EMA) else "")
        seeds = ", ".join(map(str, self.settings.seeds))
        caption = f"{tag}: " + " | ".join(self.settings.prompts) + f" (seeds {seeds})"
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image(name, np.asarray(grid), step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({name: wandb.Image(grid, caption=caption)}, step=step)


def earlier_validation(metrics_path: Path | None) -> list[tuple[int, dict[str, float]]]:
    """The validation losses an earlier run of this adapter wrote to its metrics.json."""
    try:
        recorded = json.loads(metrics_path.read_text())["validation"]
        return [(int(entry["step"]), {k: float(v) for k, v in entry.items() if k != "step"}) for entry in recorded]
    except (AttributeError, OSError, KeyError, TypeError, ValueError):
        return []


def eval_call(family: Any, settings: EvalSettings, prompt: str, seed: int) -> dict[str, Any]:
    """The eval pipeline call's keywords for one image (RecordedPrompts records its prompts)."""
    return dict(prompt=prompt, num_inference_steps=settings.inference_steps, height=settings.resolution,
                width=settings.resolution, generator=torch.Generator(device="cpu").manual_seed(seed),
                **family.eval_call_kwargs(settings.guidance_scale))


def record_eval_prompts(family: Any, settings: EvalSettings, accelerator: Any) -> RecordedPrompts:
    """Encode the eval prompts now, while the text encoders are loaded, so no eval needs them again."""
    recorded = RecordedPrompts()
    recorded.record(family, [eval_call(family, settings, p, settings.seed) for p in settings.prompts], accelerator)
    return recorded
