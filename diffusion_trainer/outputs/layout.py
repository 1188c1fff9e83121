"""Where a run's outputs go, and what their files are called.

A standalone run writes everything under `output_dir`:

    <output_dir>/<adaptor_name>/                      the adapter (WEIGHTS_NAME, INFO_NAME, the single file)
    <output_dir>/eval_images/<adaptor_name>/          before.png, epoch_0001.png …, final.png
    <output_dir>/logs/<adaptor_name>/                 TensorBoard (and W&B) logs
    <output_dir>/checkpoints/<adaptor_name>/run-*/    checkpoints, one folder per run
    <output_dir>/cache/                               latent caches, shared by runs

A Lab launch puts the adapter, eval images, logs and checkpoints where its Lab looks
(lab/launch.py); the latent cache stays under output_dir.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' load_lora_weights reads
INFO_NAME = "tlab_adaptor_info.json"  # the adapter's record: the Lab reads this name
BEFORE = "before"  # the eval image drawn before the first step: before.png
NO_EMA = "_no_ema"  # the suffix of eval images drawn without the EMA weights (eval_also_without_ema)

# Folders kept beside the adapters in output_dir (the demo's two included): an adapter by one of
# these names would replace them.
RESERVED_NAMES = frozenset({"checkpoints", "logs", "eval_images", "cache", "demo_inputs", "demo_eval"})


def single_file_name(adaptor_name: str) -> str:
    """The one-file LoRA for ComfyUI, A1111/Forge and civitai (export.py) is named after the adapter."""
    name = f"{adaptor_name}.safetensors"
    return name if name != WEIGHTS_NAME else f"{adaptor_name}.single.safetensors"


@dataclass(frozen=True)
class RunPaths:
    """The folders one run writes."""

    output_dir: Path
    adapter_dir: Path
    eval_images_dir: Path
    logs_dir: Path
    checkpoints_dir: Path
    own_checkpoints_dir: bool = False  # checkpoints_dir is this run's alone (a Lab job's): no run folders in it

    @classmethod
    def under(cls, output_dir: str | Path, adaptor_name: str) -> "RunPaths":
        """The standalone layout above."""
        root = Path(output_dir).expanduser()
        return cls(root, root / adaptor_name, root / "eval_images" / adaptor_name, root / "logs" / adaptor_name,
                   root / "checkpoints" / adaptor_name)

    @property
    def cache_dir(self) -> Path:
        return self.output_dir / "cache"

    def written(self) -> tuple[Path, ...]:
        """Every folder the run writes (left out of a dataset folder they lie in)."""
        return (self.output_dir, self.adapter_dir, self.eval_images_dir, self.logs_dir, self.checkpoints_dir)
