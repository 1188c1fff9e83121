"""Shared fixtures: tiny pipelines and datasets, built once per session, all offline."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Under pytest-xdist (README's test command runs one worker per core) each worker is a process of its
# own: its own Lab workspace, and torch threads shared out so workers do not fight over the cores.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER:
    _THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)  # also for the subprocesses tests start
    os.environ["TFL_HOME_DIR"] = __import__("tempfile").mkdtemp(prefix=f"tfl_home_{_WORKER}_")
    os.environ.pop("TFL_WORKSPACE_DIR", None)

# The Lab SDK reads these at import time; one workspace serves the whole session.
_LAB_HOME = Path(os.environ.setdefault("TFL_HOME_DIR", str(Path(__import__("tempfile").mkdtemp(prefix="tfl_home_")))))
os.environ.setdefault("TFL_WORKSPACE_DIR", str(_LAB_HOME / "workspace"))
Path(os.environ["TFL_WORKSPACE_DIR"]).mkdir(parents=True, exist_ok=True)
os.environ.pop("_TFL_JOB_ID", None)
for _key in [k for k in os.environ if k.startswith("WANDB_")]:  # hermetic: tests that want W&B set it up
    del os.environ[_key]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import main  # noqa: E402  (the entry point under test, as the Lab's harness imports it)
from diffusion_trainer.demo import (
    shapes,  # noqa: E402
    tiny_flux2,  # noqa: E402
    tiny_models,  # noqa: E402
)
from diffusion_trainer.demo.tiny_models import save_pipeline, tiny_sd_pipeline  # noqa: E402

if _WORKER:
    import torch  # noqa: E402

    torch.set_num_threads(_THREADS)

FAMILY_BUILDERS = {
    "sdxl": tiny_models.tiny_sdxl_pipeline,
    "sd3": tiny_models.tiny_sd3_pipeline,
    "sd3_without_t5": lambda: tiny_models.tiny_sd3_pipeline(with_t5=False),
    "flux": tiny_models.tiny_flux_pipeline,
    "flux_schnell_like": lambda: tiny_models.tiny_flux_pipeline(guidance_embeds=False),
    "flux2": tiny_flux2.tiny_flux2_pipeline,
    "flux2_klein": tiny_flux2.tiny_flux2_klein_pipeline,
    # issue 22
    "chroma": tiny_models.tiny_chroma_pipeline,
    "z_image": tiny_models.tiny_z_image_pipeline,
    "qwen_image": tiny_models.tiny_qwen_image_pipeline,
}


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A saved tiny Stable Diffusion 1.x-style pipeline (epsilon prediction)."""
    return save_pipeline(tiny_sd_pipeline(seed=0), tmp_path_factory.mktemp("models") / "tiny_sd")


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory) -> Path:
    """The same, but its scheduler says v_prediction (like SD 2.x 768)."""
    return save_pipeline(tiny_sd_pipeline(seed=0, prediction_type="v_prediction"),
                         tmp_path_factory.mktemp("models") / "tiny_sd_v")


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """tiny_family("sdxl") -> a saved tiny pipeline of that family, built once per session."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = save_pipeline(FAMILY_BUILDERS[name](), tmp_path_factory.mktemp("models") / name)
        return built[name]

    return get


@pytest.fixture(scope="session")
def star_folder(tmp_path_factory) -> Path:
    """Eight purple-star images with same-named .txt captions ('a sks star', …)."""
    rng = random.Random(0)
    return shapes.write_captioned_folder(tmp_path_factory.mktemp("data") / "stars",
                                         [shapes.concept_sample(rng, "sks") for _ in range(8)])


@pytest.fixture(scope="session")
def world_folder(tmp_path_factory) -> Path:
    """Eight shapes-world images, captions without any trigger word."""
    rng = random.Random(1)
    return shapes.write_captioned_folder(tmp_path_factory.mktemp("data") / "world",
                                         [shapes.world_sample(rng)[:2] for _ in range(8)])


@pytest.fixture(scope="session")
def star_imagefolder(tmp_path_factory) -> Path:
    """The Lab's image-dataset layout: an imagefolder with metadata.jsonl (file_name, text)."""
    rng = random.Random(2)
    folder = tmp_path_factory.mktemp("data") / "stars_imagefolder"
    folder.mkdir()
    rows = []
    for i in range(8):
        image, caption = shapes.concept_sample(rng, "sks")
        image.save(folder / f"star_{i}.png")
        rows.append(json.dumps({"file_name": f"star_{i}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="session")
def one_star(tmp_path_factory) -> Path:
    """One purple star, eight times (so a batch of 8 overfits one image with less noise)."""
    image, caption = shapes.concept_sample(random.Random(3), "sks")
    return shapes.write_captioned_folder(tmp_path_factory.mktemp("data") / "one_star", [(image, caption)] * 8)


# The plugin Lab's SDKs: 0.0.83 shipped with the last Lab that ran trainer plugins (app v0.30.3);
# 0.0.56 is the last one before its methods became coroutines.
PLUGIN_LAB_SDKS = ("transformerlab==0.0.83", "transformerlab==0.0.56")
SDK_CACHE = ROOT / ".cache" / "lab-sdks"  # gitignored; installed once per clone


@pytest.fixture(scope="session", params=PLUGIN_LAB_SDKS[:1])
def plugin_lab_sdk(request) -> Path:
    """A folder holding one of the plugin Lab's own `lab` SDKs (0.0.83 unless a test asks for
    another with indirect parametrization), to put first on a subprocess's PYTHONPATH. Installed
    from PyPI on first use (no dependencies: the venv's fsspec, aiofiles, werkzeug… serve it),
    then reused."""
    requirement = request.param
    target = SDK_CACHE / requirement.replace("==", "-")
    if not (target / "lab" / "__init__.py").is_file():
        staging = SDK_CACHE / f".{target.name}.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "--no-deps", "--target", str(staging), requirement], check=True)
        try:
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        except OSError:  # another test worker installed it first
            shutil.rmtree(staging, ignore_errors=True)
            if not (target / "lab" / "__init__.py").is_file():
                raise
    return target


def quick_params(model: Path, dataset: Path, output: Path, **overrides) -> dict:
    """A run of a few seconds on the tiny pipeline."""
    params = {
        "adaptor_name": "test_lora", "model_name": str(model), "dataset_name": str(dataset),
        "output_dir": str(output), "resolution": 64, "center_crop": True, "train_batch_size": 2,
        "num_train_epochs": 2, "learning_rate": 1e-3, "lr_warmup_steps": 0, "lora_r": 4, "lora_alpha": 8,
        "eval_prompt": "", "eval_num_inference_steps": 2, "log_to_wandb": False, "seed": 0,
    }
    params.update(overrides)
    return params


def run_main(argv: list[str]) -> int:
    """main.main as the command line runs it: the exit status (0 on success)."""
    try:
        return main.main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def write_config(path: Path, params: dict) -> Path:
    path.write_text(json.dumps(params))
    return path


def train(tmp_path: Path, model: Path, dataset: Path, **overrides) -> tuple[int, Path]:
    """Train through main.py with a JSON config; returns (exit status, output dir)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    output = tmp_path / "output"
    config = write_config(tmp_path / "run.json", quick_params(model, dataset, output, **overrides))
    return run_main(["--config", str(config)]), output


def run_folder(output: Path, name: str = "test_lora") -> Path:
    """The one run folder under <output>/checkpoints/<name> (each run keeps its checkpoints apart)."""
    root = output / "checkpoints" / name
    runs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(runs) == 1, runs
    return runs[0]


def stop_after_denoising_steps(monkeypatch, count: int) -> list[int]:
    """Counts eval images' denoising steps; once `count` are done, the run is asked to stop, as
    SIGTERM's handler would ask. Returns the list of steps seen."""
    from diffusion_trainer.reporting import TERMINATE, Reporter
    from diffusion_trainer.run import evaluate

    denoising_steps: list[int] = []
    real_check = evaluate.Evaluator._check_stop

    def counting(self, pipeline, step, timestep, callback_kwargs):
        denoising_steps.append(step)
        return real_check(self, pipeline, step, timestep, callback_kwargs)

    def stop_asked_here(self):
        if len(denoising_steps) >= count and self.stop_reason is None:
            self.stop_reason = TERMINATE
        return self.stop_reason is not None

    monkeypatch.setattr(evaluate.Evaluator, "_check_stop", counting)
    monkeypatch.setattr(Reporter, "stop_asked_here", stop_asked_here)
    return denoising_steps
