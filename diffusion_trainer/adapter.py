"""Writing an output folder atomically (the adapter, a checkpoint): built in a temporary folder
beside the target, renamed `.NAME.ready-*` once complete, then swapped in for the target, so a
crash never leaves a half-written folder under the target's name. A run that was killed midway
leaves `.NAME.partial-*` (incomplete), `.NAME.ready-*` (complete, not yet in place) or
`.NAME.old-*` (the previous one, being replaced); `recover_leftovers` sorts them out next time."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
INFO_NAME = "tlab_adaptor_info.json"


def single_file_name(adaptor_name: str) -> str:
    """The one-file LoRA for ComfyUI, A1111/Forge and civitai (export.py) is named after the adapter."""
    name = f"{adaptor_name}.safetensors"
    return name if name != WEIGHTS_NAME else f"{adaptor_name}.single.safetensors"


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FOLDER_MODE = 0o777 & ~_current_umask()  # what mkdir would give; mkdtemp alone makes 0700


def file_mode() -> int:
    """What open() gives a new file under the current umask."""
    return 0o666 & ~_current_umask()


def give_user_modes(folder: Path) -> None:
    """Every file under `folder` with the user's usual mode: safetensors writes 0600 whatever the umask."""
    mode = file_mode()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def staging_dir(target: Path, tag: str | None = None) -> Path:
    """An empty `.NAME.partial-*` folder beside `target`, with the user's normal permissions.
    A fixed `tag` gives the same name in every process (accelerate writes one file per process)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if tag is None:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    else:
        staging = target.parent / f".{target.name}.partial-{tag}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    staging.chmod(FOLDER_MODE)
    return staging


def write_adapter_dir(target: Path, write_contents: Callable[[Path], None]) -> Path:
    """Call write_contents(tmp_dir), then swap tmp_dir in for `target`.

    An older adapter at `target` is replaced only once the new one is complete.
    """
    target = Path(target)
    staging = staging_dir(target)
    try:
        write_contents(staging)
        commit(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def commit(staging: Path, target: Path) -> None:
    """Put the complete folder `staging` in place of `target` (first marking it complete)."""
    ready = staging.with_name(staging.name.replace(".partial-", ".ready-", 1))
    give_user_modes(staging)
    staging.rename(ready)
    try:
        _swap_in(ready, target)
    except BaseException:
        shutil.rmtree(ready, ignore_errors=True)
        raise


def _swap_in(staging: Path, target: Path) -> None:
    if not target.exists():
        staging.rename(target)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    retired.rmdir()
    target.rename(retired)
    try:
        staging.rename(target)
    except BaseException:
        retired.rename(target)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def remove_atomically(target: Path) -> None:
    """Delete a folder so that a kill midway leaves an `.old-*` leftover, never a half folder."""
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    retired.rmdir()
    target.rename(retired)
    shutil.rmtree(retired, ignore_errors=True)


def leftovers(folder: Path) -> dict[str, dict[str, list[Path]]]:
    """{NAME: {"partial"|"ready"|"old": [paths]}} for the hidden leftovers in `folder`."""
    found: dict[str, dict[str, list[Path]]] = {}
    if not folder.is_dir():
        return found
    for path in folder.iterdir():
        if not path.name.startswith("."):
            continue
        for kind in ("partial", "ready", "old"):
            name, sep, _ = path.name[1:].rpartition(f".{kind}-")
            if sep and name:
                found.setdefault(name, {"partial": [], "ready": [], "old": []})[kind].append(path)
                break
    return found


def recover_leftovers(folder: Path, only: str | None = None) -> list[str]:
    """Tidy what killed writes left in `folder` (for the folder named `only`, or all), and say what
    was done. A complete new folder (`.ready-*`) is put in place; when a swap was cut between its two
    renames, the previous folder comes back if there is no complete new one; the rest is removed."""
    notes = []
    for name, kinds in leftovers(Path(folder)).items():
        if only is not None and name != only:
            continue
        target = Path(folder) / name
        ready = sorted(kinds["ready"], key=lambda p: p.stat().st_mtime_ns)
        if ready:
            _swap_in(ready.pop(), target)
            notes.append(f"{target}: put in place the complete folder an interrupted run had written.")
        elif not target.exists() and kinds["old"]:
            newest_old = max(kinds["old"], key=lambda p: p.stat().st_mtime_ns)
            newest_old.rename(target)
            kinds["old"].remove(newest_old)
            notes.append(f"{target}: restored the previous folder an interrupted write had moved aside.")
        stale = ready + kinds["partial"] + kinds["old"]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        if stale:
            notes.append(f"{target}: removed {len(stale)} leftover temporary folder(s) of interrupted writes.")
    return notes


def adaptor_info(*, architecture: str, base_model: str, rank: int, alpha: int,
                 target_modules: list[str], trigger_word: str, parameters: dict[str, Any],
                 steps_trained: int, epochs_trained: int, final_loss: float | None,
                 prediction_type: str | None, stopped_early: bool) -> dict[str, Any]:
    return {
        "model_architecture": architecture,
        "base_model": base_model,
        "lora_config": {"r": rank, "lora_alpha": alpha, "target_modules": sorted(target_modules)},
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
    text = f"""# {name}

A LoRA adapter for `{info['base_model']}` ({info['model_architecture']}), made with Diffusion Trainer.

- Trigger word: {f'`{trigger}`' if trigger else '(none)'}
- LoRA rank {lora['r']}, alpha {lora['lora_alpha']} (scale {lora['lora_alpha'] / lora['r']:g}) on {', '.join(lora['target_modules'])}
- {status} {info['steps_trained']} optimizer steps ({info['epochs_trained']} epochs); last logged loss {loss}

```python
import torch
from diffusers import {pipeline_class}

pipe = {pipeline_class}.from_pretrained("{info['base_model']}", torch_dtype=torch.float16).to("cuda")
pipe.load_lora_weights("{name}", weight_name="{WEIGHTS_NAME}")
image = pipe("{prompt}").images[0]
```

For ComfyUI, AUTOMATIC1111/Forge and civitai use `{single_file_name(name)}`: the same LoRA as one file, at
the trained strength, in the keys those tools read.

Every training parameter is in `{INFO_NAME}`.
"""
    (directory / "README.md").write_text(text)
