"""The memory plan (diffusion_trainer/memory/plan.py) against the trainer's own training step
simulated with fake tensors (memory/simulate.py), and against issue 19's goals.

The simulated cases run the family's `predict`, the trainer's loss, backward and an AdamW step at
real width and resolution. To keep the suite fast only FLUX.1-dev runs at full depth; the other
transformer cases have fewer blocks (4, SD3.5 Medium with 2 of them dual-attention; FLUX.2-dev 2 of
each kind) and SDXL runs at 512 px, written as a config-only pipeline folder of that depth, and
the plan predicts that same reduced model. `python bench/memory_simulation.py` prints every model at full
depth (the README table); issue 22's families' full-depth figures are checked against what it printed
(RECORDED), the only check of Chroma's, Z-Image's, Qwen-Image's and FLUX.2 [klein]'s fit here.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from diffusion_trainer.families import family_for
from diffusion_trainer.memory.plan import Planner, Run, Settings, make_plan
from diffusion_trainer.memory.simulate import simulate_run

sys.path.insert(0, str(Path(__file__).parent))
from conftest import run_main, write_config  # noqa: E402

REAL = Path(__file__).parent / "real_configs"


def reduced(tmp_path: Path, model: str, **depth) -> Path:
    """A copy of a real config folder whose denoiser has fewer blocks."""
    folder = tmp_path / model
    shutil.copytree(REAL / model, folder)
    config_file = folder / "transformer" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **depth}))
    return folder


CASES = [  # (model, depth overrides, resolution, gradient checkpointing)
    ("flux1_dev", {}, 1024, True),
    ("sd35_large", {"num_layers": 4}, 1024, True),
    ("sd35_medium", {"num_layers": 4, "dual_attention_layers": [0, 1]}, 1024, False),
    ("sdxl", {}, 512, True),
    ("sd15", {}, 512, False),
    # issue 22 (real widths, 512 caption tokens); the other new families through RECORDED below only, to
    # keep within the suite's time budget
    ("flux2_dev", {"num_layers": 2, "num_single_layers": 2}, 1024, True),
]


@pytest.mark.parametrize("model,depth,resolution,checkpointing", CASES,
                         ids=[f"{c[0]}-{'full' if not c[1] else 'reduced'}-{'gc' if c[3] else 'nogc'}" for c in CASES])
def test_the_plan_predicts_the_simulated_training_step_within_10_percent(tmp_path, model, depth, resolution,
                                                                        checkpointing):
    source = str(reduced(tmp_path, model, **depth) if depth else REAL / model)
    lora_layers = "default"
    run = Run(resolution, 1, 16, lora_layers, "bf16")
    planned = Planner(family_for(source), source, run).plan(Settings("bf16", checkpointing, "none"), None)
    predicted = next(s for s in planned.stages if s.name == "train step").peak_gb
    simulated = simulate_run(source, resolution=resolution, batch_size=1, rank=16, lora_layers=lora_layers,
                             checkpointing=checkpointing).peak_gb
    assert abs(predicted - simulated) <= 0.10 * simulated, (predicted, simulated)


# Simulated train-step peaks at full depth, GB (bf16, bf16 + gradient checkpointing; 1024 px, rank 16, batch 1),
# as `python bench/memory_simulation.py --models <name>` printed them (2026-12-03): 5-25 s each, too slow
# to run all here; the reduced-depth cases above run the same simulation.
RECORDED = {"flux2_dev": (148.9, 71.3), "flux2_klein_4b": (26.9, 10.0), "chroma1_hd": (53.1, 20.8),
            "z_image_turbo": (51.3, 15.1), "qwen_image": (78.3, 43.9)}


@pytest.mark.parametrize("model", list(RECORDED))
def test_the_plan_of_issue_22s_families_counts_their_activations_at_full_depth(model):
    source = str(REAL / model)
    planner = Planner(family_for(source), source, Run(1024, 1, 16, "default", "bf16"))
    for checkpointing, simulated in zip((False, True), RECORDED[model]):
        plan = planner.plan(Settings("bf16", checkpointing, "none"), None)
        train_step = next(s for s in plan.stages if s.name == "train step")
        assert abs(train_step.peak_gb - simulated) <= 0.10 * simulated, (checkpointing, train_step.peak_gb, simulated)
        assert not any("not modelled" in note for note in plan.notes)


GOALS = [  # issue 19, item 6: (model, resolution, GPU GB, storages the plan may not use)
    ("flux1_dev", 1024, 24, {"nf4"}), ("flux1_dev", 1024, 16, set()), ("flux1_dev", 1024, 8, set()),
    ("sd35_large", 1024, 24, set()), ("sd35_large", 1024, 16, set()), ("sd35_large", 1024, 8, set()),
    ("sdxl", 1024, 24, set()), ("sdxl", 1024, 16, set()), ("sdxl", 1024, 8, {"fp8", "int8", "nf4"}),
    ("sd15", 512, 24, set()), ("sd15", 512, 8, set()), ("sd15", 512, 4, set()),
    # issue 22: what fits (FLUX.2-dev's 24 B text encoder needs 13.4 GB even in 4 bits: not on 8 GB)
    ("flux2_dev", 1024, 24, set()), ("flux2_dev", 1024, 16, set()),
    ("flux2_klein_4b", 1024, 16, {"fp8", "int8", "nf4"}), ("flux2_klein_4b", 1024, 8, set()),
    ("chroma1_hd", 1024, 24, {"fp8", "int8", "nf4"}), ("chroma1_hd", 1024, 8, set()),
    ("z_image_turbo", 1024, 16, {"fp8", "int8", "nf4"}), ("z_image_turbo", 1024, 8, set()),
    ("qwen_image", 1024, 24, set()), ("qwen_image", 1024, 16, set()),
]


@pytest.mark.parametrize("model,resolution,budget,refused", GOALS, ids=[f"{g[0]}-{g[2]}GB" for g in GOALS])
def test_auto_settings_fit_the_goals_of_issue_19(model, resolution, budget, refused):
    source = str(REAL / model)
    plan = make_plan(family_for(source), source, Run(resolution, 1, 16, "default", "bf16", eval_images=True),
                     base_precision="auto", offload="auto", gradient_checkpointing=False, budget_gb=budget)
    assert plan.fits and plan.peak_gb <= budget
    assert plan.settings.base_precision not in refused
    assert any(note.startswith("chosen:") for note in plan.notes)


def test_plan_command_fits_exit_0_and_explicit_settings_that_do_not_fit_exit_2(tmp_path, capsys):
    config = write_config(tmp_path / "run.json", {"adaptor_name": "a", "model_name": str(REAL / "flux1_dev"),
                                                  "dataset_name": "./nowhere", "resolution": 1024, "lora_r": 16,
                                                  "mixed_precision": "bf16"})
    assert run_main(["plan", "--config", str(config), "--gpu-memory-gb", "16"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("fits: peak ") and out[-1].endswith(" of 16.0 GB")
    assert any(line.strip().startswith("train step") for line in out)
    assert run_main(["plan", "--config", str(config), "--gpu-memory-gb", "16", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["peak_gb"] <= 16 and plan["settings"]["base_precision"] in {"int8", "nf4"}
    assert [s["name"] for s in plan["stages"]][:3] == ["encode text", "encode images", "train step"]
    code = run_main(["plan", "--config", str(config), "--gpu-memory-gb", "24", "--set", "base_precision=bf16",
                     "--set", "offload=none"])
    err = capsys.readouterr().err
    assert code == 2
    assert "needs 56." in err and "24.0 GB free" in err and "base_precision=fp8" in err


def test_a_run_whose_explicit_settings_cannot_fit_stops_before_loading(tmp_path, tiny_sd, star_folder, capsys):
    config = write_config(tmp_path / "run.json", {
        "adaptor_name": "a", "model_name": str(tiny_sd), "dataset_name": str(star_folder),
        "output_dir": str(tmp_path / "out"), "resolution": 64, "gpu_memory_gb": 0.001,
        "base_precision": "fp32", "offload": "none"})
    assert run_main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "memory plan: base_precision=fp32" in err and "0.0 GB free" in err
    assert not (tmp_path / "out" / "a").exists()


def test_a_quantized_base_is_planned_within_10_percent_of_its_simulated_step(tmp_path):
    """int8 storage through torchao's own quantize_ (as diffusers' TorchAoConfig applies it), under fake
    tensors, on SD3.5 Large at 1024 px with 4 of its 38 blocks; bench/memory_simulation.py runs every
    storage on every model at full depth."""
    pytest.importorskip("torchao", reason="int8 storage is simulated with torchao, which is not installed")
    source = str(reduced(tmp_path, "sd35_large", num_layers=4))
    planned = Planner(family_for(source), source, Run(1024, 1, 16, "default", "bf16")).plan(
        Settings("int8", True, "none"), None)
    predicted = next(s for s in planned.stages if s.name == "train step").peak_gb
    bf16 = simulate_run(source, resolution=1024, batch_size=1, rank=16, lora_layers="default", checkpointing=True)
    simulated = simulate_run(source, resolution=1024, batch_size=1, rank=16, lora_layers="default",
                             checkpointing=True, base_precision="int8")
    assert simulated.weights_gb < 0.6 * bf16.weights_gb  # the base really is stored in 8 bits
    assert abs(predicted - simulated.peak_gb) <= 0.10 * simulated.peak_gb, (predicted, simulated.peak_gb)


def test_the_plan_says_what_host_ram_the_run_needs(tmp_path, capsys):
    """Staged loading holds one component at a time in host RAM (issue 19: FLUX.1-dev at most its
    largest component in its storage form plus a few GB; fp8 too, cast tensor by tensor as it is read);
    offloaded blocks live there, pinned."""
    config = write_config(tmp_path / "run.json", {"adaptor_name": "a", "model_name": str(REAL / "flux1_dev"),
                                                  "dataset_name": "./nowhere", "resolution": 1024, "lora_r": 16,
                                                  "mixed_precision": "bf16"})
    plans = {}
    for storage, offload in (("int8", "none"), ("fp8", "none"), ("bf16", "blocks")):
        assert run_main(["plan", "--config", str(config), "--json", "--set", f"base_precision={storage}",
                         "--set", f"offload={offload}", "--set", "gradient_checkpointing=true"]) == 0
        plans[storage] = json.loads(capsys.readouterr().out)
    int8, offloaded = plans["int8"], plans["bf16"]
    by_stage = {s["name"]: s["host_ram_gb"] for s in int8["stages"]}
    transformer_int8 = next(v for k, v in next(s for s in int8["stages"] if s["name"] == "train step")
                            ["on_device"].items() if k.startswith("transformer"))
    assert int8["host_ram_gb"] == max(by_stage.values())
    assert transformer_int8 < int8["host_ram_gb"] <= transformer_int8 + 4  # the transformer, not T5 and it together
    assert by_stage["encode text"] < by_stage["train step"] and by_stage["encode images"] < 4
    assert offloaded["host_ram_gb"] >= 23.8  # the whole bf16 transformer, pinned in host memory
    fp8 = plans["fp8"]
    transformer_fp8 = next(v for k, v in fp8["stages"][-1]["on_device"].items() if k.startswith("transformer"))
    assert transformer_fp8 < 0.7 * 23.8 and fp8["host_ram_gb"] <= transformer_fp8 + 4  # cast as read, no bf16 copy
    assert run_main(["plan", "--config", str(config), "--set", "base_precision=int8", "--set", "offload=none"]) == 0
    assert f"host RAM: peak {int8['host_ram_gb']:.1f} GB" in capsys.readouterr().out


@pytest.mark.parametrize("storage", ["fp8", "nf4"])
def test_fp8_and_nf4_bases_are_planned_within_10_percent_of_their_simulated_step(tmp_path, storage):
    """FLUX.1-dev at 1024 px with 2 double and 4 single blocks: fp8 through diffusers' layerwise
    casting, nf4 through bitsandbytes' own 4-bit functions (memory/storage_sim.py)."""
    if storage == "nf4":
        pytest.importorskip("bitsandbytes", reason="nf4 storage is simulated with bitsandbytes, which is not installed")
    source = str(reduced(tmp_path, "flux1_dev", num_layers=2, num_single_layers=4))
    planned = Planner(family_for(source), source, Run(1024, 1, 16, "default", "bf16")).plan(
        Settings(storage, True, "none"), None)
    predicted = next(s for s in planned.stages if s.name == "train step").peak_gb
    simulated = simulate_run(source, resolution=1024, batch_size=1, rank=16, lora_layers="default",
                             checkpointing=True, base_precision=storage).peak_gb
    assert abs(predicted - simulated) <= 0.10 * simulated, (predicted, simulated)


def test_offloaded_blocks_are_planned_within_10_percent_of_the_simulated_swap(tmp_path):
    """offload=blocks as memory/offload.py swaps them (two blocks on the device), counted in the
    simulated step of SD3.5 Large at 1024 px with 6 of its 38 blocks (blocks of one size: in a
    shallow Flux the double blocks' turn in backward, not the last two blocks, sets the peak)."""
    source = str(reduced(tmp_path, "sd35_large", num_layers=6))
    planner = Planner(family_for(source), source, Run(1024, 1, 16, "default", "bf16"))
    predicted = next(s for s in planner.plan(Settings("bf16", True, "blocks"), None).stages
                     if s.name == "train step").peak_gb
    kept = simulate_run(source, resolution=1024, batch_size=1, rank=16, lora_layers="default", checkpointing=True)
    swapped = simulate_run(source, resolution=1024, batch_size=1, rank=16, lora_layers="default",
                           checkpointing=True, offload="swap")
    assert swapped.peak_gb < kept.peak_gb - 1.0  # four of the six blocks' weights (1.7 GB) stay in host memory
    assert abs(predicted - swapped.peak_gb) <= 0.10 * swapped.peak_gb, (predicted, swapped.peak_gb)


def test_auto_takes_settings_that_fit_the_hosts_ram_too_and_says_what_the_others_needed(tmp_path, capsys):
    """FLUX.1-dev on an 8 GB GPU: bf16 with offload keeps the 23.8 GB transformer pinned in host RAM,
    so with 24 GB of RAM auto stores it in fp8 (15.1 GB) and says why; when nothing fits the host's
    RAM it keeps the GPU's choice and warns, naming the least the host would need."""
    config = write_config(tmp_path / "run.json", {"adaptor_name": "a", "model_name": str(REAL / "flux1_dev"),
                                                  "dataset_name": "./nowhere", "resolution": 1024, "lora_r": 16,
                                                  "mixed_precision": "bf16"})
    plans = {}
    for host in ("64", "24", "8"):
        assert run_main(["plan", "--config", str(config), "--gpu-memory-gb", "8", "--host-memory-gb", host,
                         "--json"]) == 0
        plans[host] = json.loads(capsys.readouterr().out)
    assert plans["64"]["settings"]["base_precision"] == "bf16" and plans["64"]["settings"]["offload"] == "blocks"
    roomy, tight, tiny = plans["64"], plans["24"], plans["8"]
    assert roomy["host_ram_gb"] > 24 and roomy["fits_host"]
    assert tight["settings"]["base_precision"] == "fp8" and tight["settings"]["offload"] == "blocks"
    assert tight["fits_host"] and tight["host_ram_gb"] <= 24 and tight["peak_gb"] <= 8
    assert any(f"bf16 + checkpointing + offload needs {roomy['host_ram_gb']:.1f} GB of host RAM" in n
               for n in tight["notes"]), tight["notes"]
    assert not tiny["fits_host"] and tiny["settings"] == roomy["settings"]
    warning = next(n for n in tiny["notes"] if n.startswith("host RAM:"))
    assert "8.0 GB available" in warning and "nf4" in warning, warning
    assert run_main(["plan", "--config", str(config), "--gpu-memory-gb", "8", "--host-memory-gb", "24"]) == 0
    assert "host RAM: peak" in (out := capsys.readouterr().out) and "of 24.0 GB" in out
    assert run_main(["plan", "--config", str(config), "--gpu-memory-gb", "8", "--host-memory-gb", "24", "--json",
                     "--set", "base_precision=bf16", "--set", "offload=blocks"]) == 0  # explicit: kept, with advice
    explicit = json.loads(capsys.readouterr().out)
    assert explicit["settings"] == roomy["settings"] and not explicit["fits_host"]
    assert any(n.startswith("host RAM:") and "base_precision=fp8" in n for n in explicit["notes"]), explicit["notes"]
    assert run_main(["plan", "--config", str(config), "--host-memory-gb", "0"]) == 2
    assert "--host-memory-gb: must be greater than 0 (got 0)" in capsys.readouterr().err


def test_a_run_plans_against_its_share_of_this_machines_ram(monkeypatch):
    """Each process the launcher starts on a machine loads the model: a run's host budget is the
    machine's RAM over LOCAL_WORLD_SIZE. FLUX.1-dev on an 8 GB GPU, 48 GB of RAM: one process takes
    bf16 + offload (26.8 GB); two, 24 GB each, take fp8 + offload."""
    from diffusion_trainer.memory import plan as memory_plan
    from diffusion_trainer.params import TrainingParams
    from diffusion_trainer.run import train

    said = []
    reporter = type("Reporter", (), {"info": lambda self, message: said.append(message)})()
    params = TrainingParams(adaptor_name="a", model_name=str(REAL / "flux1_dev"), dataset_name="./nowhere",
                            resolution=1024, lora_r=16, mixed_precision="bf16", gpu_memory_gb=8)
    monkeypatch.setattr(memory_plan, "host_ram_total_gb", lambda: 48.0)
    chosen = {}
    for local in ("1", "2"):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        planned, _ = train.planned_settings(params, reporter)
        chosen[local] = (planned.base_precision, planned.offload)
    assert chosen == {"1": ("bf16", "blocks"), "2": ("fp8", "blocks")}
    assert any("of 24.0 GB" in line for line in said if line.strip().startswith("host RAM: peak"))


def test_the_plan_computes_in_the_dtype_the_run_computes_in(capsys, tmp_path):
    """mixed_precision=no trains every storage's layers in fp32 (no autocast: run/setup.py): the plan
    counts fp32 activations and upcast copies, twice bf16's, and says what bf16 would need; fp16 and
    bf16 compute in their own dtype."""
    from diffusion_trainer.families.flux import Flux
    from diffusion_trainer.memory import storage
    from diffusion_trainer.run import setup

    planner = Planner(Flux, str(REAL / "flux1_dev"), Run(1024, 1, 16, "default", "no"))
    for mixed in ("no", "fp16", "bf16"):
        for precision in ("fp32", "bf16", "fp8", "int8", "nf4"):
            runs_in = storage.resolve_storage(precision, setup.WEIGHT_DTYPES[mixed], setup.WEIGHT_DTYPES[mixed])
            assert planner.with_run(Run(1024, 1, 16, "default", mixed)).compute(Settings(precision, True, "none")) == \
                storage.NAMES[runs_in.compute_dtype], (mixed, precision)
    fp8 = Settings("fp8", True, "none")
    full = planner.plan(fp8, 24).stages[-1].on_device
    half = planner.with_run(Run(1024, 1, 16, "default", "bf16")).plan(fp8, 24).stages[-1].on_device
    assert full["activations (checkpointed)"] == pytest.approx(2 * half["activations (checkpointed)"])
    assert full["upcast weight copies"] == pytest.approx(2 * half["upcast weight copies"])
    config = write_config(tmp_path / "run.json", {"adaptor_name": "a", "model_name": str(REAL / "flux1_dev"),
                                                  "dataset_name": "./nowhere", "resolution": 1024, "lora_r": 16})
    assert run_main(["plan", "--config", str(config), "--gpu-memory-gb", "24"]) == 0  # mixed_precision: no
    out = capsys.readouterr().out
    assert "base_precision=fp8" in out and "mixed_precision=bf16 would need 18.7 GB with these settings" in out


@pytest.mark.parametrize("model", ["flux1_dev", "sd35_large", "sdxl", "sd15"])
def test_task_yamls_gpu_fits_the_default_run_of_each_model(model):
    """task.yaml asks for an L4 (24 GB): the form's defaults (mixed_precision no, every other default)
    at each model's own resolution fit it, as the plan auto-chooses."""
    from diffusion_trainer.lab.manifest import TASK_ACCELERATORS
    from diffusion_trainer.memory.plan import plan_for
    from diffusion_trainer.params import TrainingParams

    assert TASK_ACCELERATORS == "L4:1"
    resolution = 512 if model == "sd15" else 1024
    params = TrainingParams(adaptor_name="a", model_name=str(REAL / model), dataset_name="./nowhere",
                            resolution=resolution, gpu_memory_gb=24)
    assert params.mixed_precision == "no"
    plan = plan_for(params)
    assert plan.fits and plan.peak_gb <= 24
