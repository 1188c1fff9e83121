"""The adapter folder: its weights, its info file (the Lab and `export` read it), the model card and
the single-file LoRA, written in one atomic step; and where it goes when it cannot go in place.

Saving never loses trained weights: a stopped run that trained fewer steps than the adapter already
in place writes beside it; a write that fails (a full disk, whatever the library's error type) goes
to a named rescue folder, and the run then fails saying where.
"""

from __future__ import annotations

import json
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

from peft.utils import get_peft_model_state_dict

from .. import atomic
from ..lora import loaders, lora_metadata, single_file_written
from . import export
from .layout import INFO_NAME, WEIGHTS_NAME, single_file_name


class RunFailed(RuntimeError):
    """The run ended without its adapter in place; the message says where the weights are."""


def adaptor_info(*, architecture: str, base_model: str, rank: int, alpha: int,
                 target_modules: list[str], trigger_word: str, parameters: dict[str, Any],
                 steps_trained: int, epochs_trained: int, final_loss: float | None,
                 prediction_type: str | None, stopped_early: bool, lora_type: str = "lora",
                 text_encoder_targets: dict[str, list[str]] | None = None,
                 single_file_form: str = "kohya") -> dict[str, Any]:
    """`rank`/`alpha`: as saved (a PiSSA/OLoRA adapter is saved at twice the trained rank);
    `text_encoder_targets`: per trained text encoder, the layers its adapter is on."""
    return {
        "model_architecture": architecture,
        "base_model": base_model,
        "lora_config": {"r": rank, "lora_alpha": alpha, "target_modules": sorted(target_modules),
                        "lora_type": lora_type, "text_encoders": text_encoder_targets or {}},
        "loaders": loaders(lora_type, single_file_form),
        "trigger_word": trigger_word,
        "prediction_type": prediction_type,
        "steps_trained": steps_trained,
        "epochs_trained": epochs_trained,
        "final_loss": final_loss,
        "stopped_early": stopped_early,
        "parameters": parameters,
        "tlab_trainer_used": True,
    }


def write_info(directory: Path, info: dict[str, Any]) -> None:
    (directory / INFO_NAME).write_text(json.dumps(info, indent=2, default=str) + "\n")


def write_model_card(directory: Path, name: str, info: dict[str, Any], pipeline_class: str) -> None:
    trigger = info["trigger_word"]
    prompt = f"{trigger} ..." if trigger else "your prompt"
    lora = info["lora_config"]
    status = "stopped early at" if info["stopped_early"] else "trained for"
    loss = f"{info['final_loss']:.4f}" if info["final_loss"] is not None else "n/a"
    kind = {"lora": "LoRA", "dora": "DoRA", "lokr": "LoKr", "loha": "LoHa"}[lora.get("lora_type", "lora")]
    text = "".join(f"; {attr} too" for attr in lora.get("text_encoders", {}))
    readers = "\n".join(f"- {loader}: {answer}" for loader, answer in
                         (info.get("loaders") or loaders(lora.get("lora_type", "lora"))).items())
    text = f"""# {name}

A LoRA adapter for `{info['base_model']}` ({info['model_architecture']}), made with Diffusion Trainer.

- Trigger word: {f'`{trigger}`' if trigger else '(none)'}
- {kind} rank {lora['r']}, alpha {lora['lora_alpha']} (scale {lora['lora_alpha'] / lora['r']:g}) on {', '.join(lora['target_modules'])}{text}
- {status} {info['steps_trained']} optimizer steps ({info['epochs_trained']} epochs); last logged loss {loss}

```python
import torch
from diffusers import {pipeline_class}

pipe = {pipeline_class}.from_pretrained("{info['base_model']}", torch_dtype=torch.float16).to("cuda")
pipe.load_lora_weights("{name}", weight_name="{WEIGHTS_NAME}")
image = pipe("{prompt}").images[0]
```

For ComfyUI, AUTOMATIC1111/Forge and civitai use `{single_file_name(name)}`: the same {kind} as one file, at
the trained strength, in the keys those tools read. Which loader reads it:

{readers}

Every training parameter is in `{INFO_NAME}`.
"""
    (directory / "README.md").write_text(text)


def save_adapter(target: Path, family: Any, name: str, info: dict[str, Any], ema: Any = None,
                 captions: list[str] | None = None, adapters: dict[str, Any] | None = None) -> Path:
    """The adapter folder at `target`: the family's diffusers LoRA file (the EMA weights when an EMA
    is given), the info file, the model card, and the same weights as one file for ComfyUI,
    A1111/Forge and civitai (for the types those read). `adapters`: lora.Adapter per component
    (default: the denoiser's PEFT adapter as it is)."""

    def write(directory: Path) -> None:
        with ema.applied() if ema is not None else nullcontext():
            if adapters is None:
                layers = {"denoiser": (get_peft_model_state_dict(family.denoiser), lora_metadata(family.denoiser))}
            else:
                layers = {component: (a.state_dict(), a.metadata()) for component, a in adapters.items()}
            family.save_adapter(directory, layers)
        write_info(directory, info)
        write_model_card(directory, name, info, family.pipeline_class.__name__)
        if single_file_written(info["lora_config"].get("lora_type", "lora"), family.single_file_form):
            # the base weights in memory: a DoRA file's dora_scale depends on them
            bases = {family.lora_save_prefix: family.denoiser,
                     **{attr: a.module for attr, a in (adapters or {}).items() if attr != "denoiser"}}
            export.write_single_file(directory, name, type(family), info, dict(family.denoiser.config), captions,
                                     base_modules=bases)

    return atomic.write_folder(target, write)


def save_somewhere(save: Callable[[Path], Path], target: Path, name: str, steps: int, stopped: bool,
                   last_checkpoint: Path | None, reporter: Any) -> Path:
    """save(folder) to `target`, or beside it when this run stopped short of the adapter already
    there; when that fails, to a rescue folder that is named; when nothing can be written, name
    `last_checkpoint`. After a rescue the run fails (RunFailed), saying where the weights are."""
    target = beside_a_longer_adapter(target, steps, stopped, reporter)
    try:
        return save(target)
    except Exception as exc:
        failure = f"The adapter could not be written to {target} ({describe(exc)})"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for root in (Path(tempfile.gettempdir()), Path.home()):
        rescue = root / "diffusion_trainer_rescued" / f"{name}-{stamp}"
        try:
            save(rescue)
        except Exception:
            continue
        reporter.warn(f"{failure}; the trained adapter was saved to {rescue} instead.")
        raise RunFailed(f"{failure}. The trained adapter was saved to {rescue} instead: move it into place "
                        "once there is room.")
    where = (f"the last good checkpoint is {last_checkpoint} (resume from it with resume_from_checkpoint=latest "
             "once there is room)") if last_checkpoint else "no checkpoint was kept"
    raise RunFailed(f"{failure}, nor to any fallback folder; {where}.")


def describe(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or f"{type(exc).__name__}: {exc}"


def beside_a_longer_adapter(target: Path, steps: int, stopped: bool, reporter: Any) -> Path:
    """`target`, unless this run stopped after fewer steps than the adapter already there: then
    `<name>-step<steps>` beside it."""
    if not stopped or not (target / INFO_NAME).is_file():
        return target
    try:
        before = int(json.loads((target / INFO_NAME).read_text()).get("steps_trained") or 0)
    except (OSError, ValueError, TypeError):
        return target
    if before <= steps:
        return target
    beside = target.with_name(f"{target.name}-step{steps}")
    reporter.warn(f"This run stopped after {steps} steps, short of the {before}-step adapter at {target}, "
                  f"which is kept; this run's adapter goes to {beside}.")
    return beside
