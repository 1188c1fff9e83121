"""The adapter folder's own files: the info file the Lab (and `export`) read, and the model card.
Written into the folder atomic.write_folder builds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
INFO_NAME = "tlab_adaptor_info.json"


def single_file_name(adaptor_name: str) -> str:
    """The one-file LoRA for ComfyUI, A1111/Forge and civitai (export.py) is named after the adapter."""
    name = f"{adaptor_name}.safetensors"
    return name if name != WEIGHTS_NAME else f"{adaptor_name}.single.safetensors"


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
