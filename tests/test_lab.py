"""The Transformer Lab launches, driven through the real `transformerlab` SDK.

The session's TFL_HOME_DIR / TFL_WORKSPACE_DIR are temporary (see conftest.py). Each test makes
a job as the Lab does, writes a Lab-shaped config (string values, bookkeeping keys), runs
main.py the way the Lab does, and reads the job back.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import ROOT

import main
from lab import Experiment, Job

WORKSPACE = Path(os.environ["TFL_WORKSPACE_DIR"])


@pytest.fixture
def lab_job(monkeypatch):
    """A fresh experiment and job; the launch environment is restored afterwards."""
    for key in ("_TFL_JOB_ID", "_TFL_EXPERIMENT_ID"):  # main.py sets them for the SDK; undo that afterwards
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    name = f"exp_{uuid.uuid4().hex[:8]}"
    experiment = asyncio.run(Experiment.create_or_get(name, create_new=True))
    return name, asyncio.run(experiment.create_job())


def lab_config(job, experiment, model, dataset, **overrides):
    """What the Lab's form posts: every value a string, plus the Lab's own keys."""
    config = {
        "adaptor_name": f"{experiment}_lora", "trigger_word": "sks", "model_name": "tiny/tiny-sd", "model_path": str(model),
        "model_architecture": "StableDiffusionPipeline", "dataset_name": str(dataset), "job_id": job.id,
        "template_name": "diffusion", "type": "LoRA", "embedding_model": "BAAI/bge-base-en-v1.5",
        "run_sweeps": "false", "experiment_name": experiment,
        "output_dir": str(WORKSPACE / "experiments" / experiment / "tensorboards"),
        "adaptor_output_dir": str(WORKSPACE / "adaptors" / "tiny_tiny-sd" / f"{experiment}_lora"),
        "num_train_epochs": "2", "train_batch_size": "2", "resolution": "64", "center_crop": "true",
        "random_flip": "false", "learning_rate": "0.001", "lr_warmup_steps": "0", "lora_r": "4", "lora_alpha": "8",
        "snr_gamma": "", "min_snr_gamma": "0", "noise_offset": "0", "use_ema": "false",
        "eval_prompt": "a sks star", "eval_steps": "1", "eval_num_inference_steps": "2",
        "eval_guidance_scale": "7.5", "log_to_wandb": "false",
    }
    config.update(overrides)
    return config


def run_like_the_harness(monkeypatch, job, experiment, config) -> int:
    """The Lab's plugin_harness: argv with --plugin_dir and --input_file, then main.main()."""
    input_file = WORKSPACE / "temp" / f"plugin_input_{job.id}.json"
    input_file.parent.mkdir(parents=True, exist_ok=True)
    input_file.write_text(json.dumps({"experiment": {"id": experiment, "name": experiment}, "config": config}))
    monkeypatch.setattr(sys, "argv", ["plugin_harness.py", "--plugin_dir", str(ROOT), "--input_file", str(input_file),
                                      "--experiment_name", experiment])
    try:
        return main.main()
    except SystemExit as exc:
        return int(exc.code or 0)


def job_state(job, experiment):
    fresh = asyncio.run(Job.get(job.id, experiment))
    return asyncio.run(fresh.get_status()), asyncio.run(fresh.get_progress()), asyncio.run(fresh.get_job_data())


def test_plugin_launch_completes_with_the_adapter_where_the_lab_looks(monkeypatch, lab_job, tiny_sd, star_folder):
    experiment, job = lab_job
    config = lab_config(job, experiment, tiny_sd, star_folder)
    assert run_like_the_harness(monkeypatch, job, experiment, config) == 0
    status, progress, data = job_state(job, experiment)
    assert (status, progress) == ("COMPLETE", 100)
    adapter = Path(config["adaptor_output_dir"])
    assert (adapter / "pytorch_lora_weights.safetensors").is_file()
    info = json.loads((adapter / "tlab_adaptor_info.json").read_text())
    assert info["parameters"]["num_train_epochs"] == 2 and info["parameters"]["center_crop"] is True
    assert sorted(p.name for p in Path(data["eval_images_dir"]).glob("*.png")) == ["epoch_0001.png", "final.png"]
    assert list(Path(data["tensorboard_output_dir"]).rglob("events.out.tfevents.*"))
    assert data["completion_status"] == "success" and str(adapter) in data["completion_details"]
    assert data["score"]["final_loss"] > 0 and data["current_metrics"]["loss"] > 0


def test_a_bad_dataset_fails_the_job_with_the_message(monkeypatch, lab_job, tiny_sd):
    experiment, job = lab_job
    config = lab_config(job, experiment, tiny_sd, "/nowhere/at/all")
    assert run_like_the_harness(monkeypatch, job, experiment, config) == 2
    status, _, data = job_state(job, experiment)
    assert status == "FAILED" and data["completion_status"] == "failed"
    assert "dataset_name: there is no folder '/nowhere/at/all'" in data["completion_details"]
    assert not Path(config["adaptor_output_dir"]).exists()


def test_bad_lab_values_fail_the_job_listing_each(monkeypatch, lab_job, tiny_sd, star_folder):
    experiment, job = lab_job
    config = lab_config(job, experiment, tiny_sd, star_folder, num_train_epochs="many", resolution="100")
    assert run_like_the_harness(monkeypatch, job, experiment, config) == 2
    status, _, data = job_state(job, experiment)
    assert status == "FAILED"
    assert "num_train_epochs" in data["completion_details"] and "resolution" in data["completion_details"]


def test_the_stop_button_saves_the_adapter_and_ends_stopped(monkeypatch, lab_job, tiny_sd, star_folder):
    experiment, job = lab_job
    config = lab_config(job, experiment, tiny_sd, star_folder, num_train_epochs="500", eval_prompt="")
    finished = threading.Event()

    def press_stop():
        other = asyncio.run(Job.get(job.id, experiment))
        while not finished.is_set() and not asyncio.run(other.get_progress()):
            time.sleep(0.05)
        # the Lab writes the flag once; our 1 Hz progress writes race the same file, so press until seen
        while not finished.wait(0.3):
            asyncio.run(other.update_job_data_field("stop", True))

    presser = threading.Thread(target=press_stop, daemon=True)
    presser.start()
    try:
        code = run_like_the_harness(monkeypatch, job, experiment, config)
    finally:
        finished.set()
        presser.join()
    assert code == 0
    status, progress, data = job_state(job, experiment)
    assert status == "STOPPED" and data["completion_status"] == "stopped"
    info = json.loads((Path(config["adaptor_output_dir"]) / "tlab_adaptor_info.json").read_text())
    assert info["stopped_early"] is True and 0 < info["steps_trained"] < 2000
    assert progress < 100


def test_task_launch_reads_parameters_from_the_job(monkeypatch, lab_job, tiny_sd, star_imagefolder):
    experiment, job = lab_job
    config = lab_config(job, experiment, tiny_sd, star_imagefolder, eval_prompt="")
    del config["adaptor_output_dir"]  # the task launch may not send it: the Lab's own layout is used
    asyncio.run(job.update_job_data_field("parameters", config))
    monkeypatch.setenv("_TFL_JOB_ID", job.id)
    monkeypatch.setenv("_TFL_EXPERIMENT_ID", experiment)
    monkeypatch.setattr(sys, "argv", ["main.py"])
    assert main.main() == 0
    status, progress, _ = job_state(job, experiment)
    assert (status, progress) == ("COMPLETE", 100)
    assert (WORKSPACE / "adaptors" / "tiny_tiny-sd" / f"{experiment}_lora" / "pytorch_lora_weights.safetensors").is_file()


def test_progress_is_written_about_once_a_second_not_every_step(monkeypatch, lab_job, tiny_sd, star_folder):
    experiment, job = lab_job
    config = lab_config(job, experiment, tiny_sd, star_folder, num_train_epochs="30", eval_prompt="")
    started = time.monotonic()
    assert run_like_the_harness(monkeypatch, job, experiment, config) == 0
    seconds = time.monotonic() - started
    rows = (WORKSPACE / "experiments" / experiment / "jobs" / job.id / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(r).get("step") for r in rows if json.loads(r).get("step")]
    assert max(steps) == 120  # 30 epochs x 4 batches
    assert len(rows) <= seconds + 3
