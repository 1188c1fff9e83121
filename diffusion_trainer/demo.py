"""The built-in default run: `python main.py` with no arguments.

Teaches a tiny Stable Diffusion-style model a new concept, `sks` = a purple star, from a small
generated dataset, all offline, in well under two minutes on a laptop CPU.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

OUTPUT = Path("output")
TRIGGER = "sks"
EVAL_PROMPT = "a sks star"


def base_model(root: Path) -> Path:
    from .tiny_models import save_pipeline, tiny_sd_pipeline

    path = root / "demo_inputs" / "base_model"
    if not (path / "model_index.json").is_file():
        save_pipeline(tiny_sd_pipeline(seed=0), path)
    return path


def concept_dataset(root: Path, count: int = 16, seed: int = 0) -> Path:
    from .shapes import concept_sample, write_captioned_folder

    path = root / "demo_inputs" / "sks_star"
    if not path.is_dir():
        rng = random.Random(seed)
        write_captioned_folder(path, [concept_sample(rng, TRIGGER) for _ in range(count)])
    return path


def demo_params(root: Path) -> dict[str, Any]:
    return {
        "adaptor_name": "sks_star", "trigger_word": TRIGGER,
        "model_name": str(base_model(root)), "dataset_name": str(concept_dataset(root)),
        "output_dir": str(root), "resolution": 64, "center_crop": True, "train_batch_size": 4,
        "num_train_epochs": 25, "learning_rate": 1e-3, "lr_scheduler": "constant", "lr_warmup_steps": 0,
        "lora_r": 8, "lora_alpha": 8, "eval_prompt": EVAL_PROMPT, "eval_steps": 25,
        "eval_num_inference_steps": 20, "log_to_wandb": False, "seed": 0,
    }


def run_demo(root: Path = OUTPUT) -> int:
    from .cli import run_standalone

    print("Diffusion Trainer demo: teaching a tiny offline model that 'sks' means a purple star.\n"
          "(Run `python main.py --config my_run.json` to train your own model; see README.md.)",
          file=sys.stderr)
    return run_standalone(demo_params(root))
