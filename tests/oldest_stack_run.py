"""Run under the oldest library versions requirements.txt allows (see test_oldest_versions.py):
import every module of the package, then train each family's tiny pipeline for two steps,
with the options that reach the most library code (bucketing, EMA, eval images).

    PYTHONPATH=<old libraries> python tests/oldest_stack_run.py <work folder> [package whose version to print…]
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.metadata
import importlib.util
import io
import json
import pkgutil
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Optional quantization backends (base_precision int8/nf4) are not among requirements.txt's floors:
# a user on the oldest libraries has none, and diffusers 0.35 cannot import beside today's torchao.
HIDDEN = ("torchao", "bitsandbytes")


def _hidden(name: str) -> bool:
    return name.split(".")[0] in HIDDEN


class _HideOptional(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if _hidden(name):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden on the oldest stack)", name=name)
        return None


_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: None if _hidden(name) else _find_spec(name, package)
sys.meta_path.insert(0, _HideOptional())


def main(work: Path) -> int:
    import diffusion_trainer
    from diffusion_trainer.cli import main as run
    from diffusion_trainer.demo import shapes, tiny_models

    for module in pkgutil.walk_packages(diffusion_trainer.__path__, "diffusion_trainer."):
        importlib.import_module(module.name)
    for package in sys.argv[2:]:
        print(f"version {package}=={importlib.metadata.version(package)}", flush=True)

    rng = random.Random(0)
    data = shapes.write_captioned_folder(work / "stars", [shapes.concept_sample(rng, "sks") for _ in range(4)])
    builders = {"sd": tiny_models.tiny_sd_pipeline, "sdxl": tiny_models.tiny_sdxl_pipeline,
                "sd3": tiny_models.tiny_sd3_pipeline, "sd3_without_t5": lambda: tiny_models.tiny_sd3_pipeline(with_t5=False),
                "flux": tiny_models.tiny_flux_pipeline}
    optimizer = {"sdxl": "adafactor"}  # transformers' Adafactor; the rest AdamW
    failed = []
    for name, build in builders.items():
        model = tiny_models.save_pipeline(build(), work / "models" / name)
        config = work / f"{name}.json"
        config.write_text(json.dumps({
            "adaptor_name": f"{name}_lora", "model_name": str(model), "dataset_name": str(data),
            "output_dir": str(work / "out"), "resolution": 64, "train_batch_size": 2, "max_train_steps": 2,
            "learning_rate": 1e-3, "lr_warmup_steps": 0, "lora_r": 4, "lora_alpha": 8, "use_ema": True,
            "aspect_ratio_bucketing": True, "eval_prompt": "a sks star", "eval_num_inference_steps": 1,
            "optimizer": optimizer.get(name, "adamw"), "log_to_wandb": False, "seed": 0}))
        code = run(["--config", str(config)])
        if code or not (work / "out" / f"{name}_lora" / "pytorch_lora_weights.safetensors").is_file():
            failed.append(name)
        print(f"{name}: exit {code}", flush=True)
    for precision, package in (("int8", "torchao"), ("nf4", "bitsandbytes")):  # hidden: named, before loading
        config = work / f"{precision}.json"
        config.write_text(json.dumps({"adaptor_name": f"{precision}_lora", "model_name": str(work / "models" / "sd"),
                                      "dataset_name": str(data), "output_dir": str(work / "out"), "resolution": 64,
                                      "max_train_steps": 1, "base_precision": precision}))
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = run(["--config", str(config)])
        named = f"needs the {package} package, which is not installed" in err.getvalue()
        if code != 2 or not named:
            failed.append(precision)
        print(f"base_precision={precision} without {package}: exit {code}, package named: {named}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1])))
