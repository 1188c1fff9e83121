"""The Transformer Lab launches, driven through the real `transformerlab` SDK.

The session's TFL_HOME_DIR / TFL_WORKSPACE_DIR are temporary (see conftest.py). Each test makes
a job as the Lab does, writes a Lab-shaped config (string values, bookkeeping keys), runs
main.py the way the Lab does, and reads the job back.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import ROOT, run_main
from lab import Experiment, Job

import main
from diffusion_trainer.lab import manifest
from diffusion_trainer.lab.launch import connect_lab
from diffusion_trainer.lab.reporter import TASK, LabReporter
from diffusion_trainer.params import FIELDS, parse_params
from diffusion_trainer.reporting import Reporter

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
    assert sorted(p.name for p in Path(data["eval_images_dir"]).glob("*.png")) == ["before.png", "epoch_0001.png", "final.png"]
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
    finished, seen = threading.Event(), threading.Event()
    read_stop_flag = LabReporter._stop_flag

    def stop_flag(reporter):
        if read_stop_flag(reporter):
            seen.set()
            return True
        return False

    monkeypatch.setattr(LabReporter, "_stop_flag", stop_flag)

    def press_stop():
        other = asyncio.run(Job.get(job.id, experiment))
        while not finished.is_set() and not asyncio.run(other.get_progress()):
            time.sleep(0.05)
        # The Lab writes the flag once; our 1 Hz progress writes race the same file (the SDK reads, then
        # rewrites it whole), so press until the run has seen it, and no more: a press racing the run's
        # final writes would put back the state it read before them.
        while not seen.is_set() and not finished.wait(0.3):
            asyncio.run(other.update_job_data_field("stop", True))

    presser = threading.Thread(target=press_stop, daemon=True)
    presser.start()
    try:
        code = run_like_the_harness(monkeypatch, job, experiment, config)
    finally:
        finished.set()
        presser.join()
    assert code == 0 and seen.is_set()
    status, progress, data = job_state(job, experiment)
    assert status == "STOPPED" and data["completion_status"] == "stopped"
    info = json.loads((Path(config["adaptor_output_dir"]) / "tlab_adaptor_info.json").read_text())
    assert info["stopped_early"] is True and 0 < info["steps_trained"] < 2000
    assert progress < 100


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


# --- the task Lab (task.yaml; outputs only through the SDK) ----------------------------------

def task_job(job, experiment, model, dataset, output: Path, **overrides):
    """A task job as the current Lab launches one: task.yaml's parameters (defaults merged with
    the user's values) stored in the job; no adaptor_output_dir, no Lab bookkeeping keys."""
    import yaml

    parameters = yaml.safe_load((ROOT / "task.yaml").read_text())["parameters"]
    parameters.update({
        "adaptor_name": f"{experiment}_lora", "model_name": str(model), "dataset_name": str(dataset),
        "output_dir": str(output), "resolution": 64, "center_crop": True, "train_batch_size": 2,
        "num_train_epochs": 2, "learning_rate": 1e-3, "lr_warmup_steps": 0, "lora_r": 4, "lora_alpha": 8,
        "eval_prompt": "a sks star", "eval_num_inference_steps": 2, "log_to_wandb": False, "seed": 0,
        "cache_latents": True,
    })
    parameters.update(overrides)
    asyncio.run(job.update_job_data_field("parameters", parameters))
    return parameters


def saved_models(data):
    return [Path(p) for p in data.get("models", [])]


def test_task_launch_hands_the_adapter_images_and_figures_to_the_sdk(monkeypatch, lab_job, tiny_sd, star_imagefolder,
                                                                     tmp_path):
    experiment, job = lab_job
    task_job(job, experiment, tiny_sd, star_imagefolder, tmp_path / "output")
    monkeypatch.setenv("_TFL_JOB_ID", job.id)
    monkeypatch.setenv("_TFL_EXPERIMENT_ID", experiment)
    monkeypatch.setenv("HF_TOKEN", "{{secret._HF_TOKEN}}")  # what the Lab sends when the user has no such secret
    assert run_main([]) == 0
    assert "HF_TOKEN" not in os.environ  # not sent to the hub as a token
    status, progress, data = job_state(job, experiment)
    assert (status, progress) == ("COMPLETE", 100)
    assert data["score"]["final_loss"] > 0 and data["current_metrics"]["loss"] > 0
    # the job's Models: the adapter folder, named <job>_<adaptor>
    (model,) = saved_models(data)
    assert model.name == f"{job.id}_{experiment}_lora"
    assert (model / "pytorch_lora_weights.safetensors").is_file()
    info = json.loads((model / "tlab_adaptor_info.json").read_text())
    assert info["model_architecture"] == "StableDiffusionPipeline" and info["stopped_early"] is False
    # the job's Artifacts: every eval image (drawn there, so the Lab shows each as it comes), the
    # before-vs-after grid, the loss curve; nothing twice
    fresh = asyncio.run(Job.get(job.id, experiment))
    names = sorted(Path(p).name for p in asyncio.run(fresh.get_artifact_paths()))
    assert names == ["before.png", "before_after.png", "epoch_0001.png", "final.png", "loss.png"]
    # the job's folders, not ./output of the working directory: the adapter and logs in
    # <job>/output (the adapter then handed to Models), checkpoints in the job's checkpoints folder
    job_dir = Path(asyncio.run(fresh.get_dir()))
    assert (job_dir / "output" / f"{experiment}_lora" / "pytorch_lora_weights.safetensors").is_file()
    assert [Path(p).name for p in asyncio.run(fresh.get_checkpoint_paths())] == ["checkpoint-8"]
    assert data["latest_checkpoint"] == str(job_dir / "checkpoints" / "checkpoint-8")
    assert not (tmp_path / "output").exists()  # output_dir would hold only a disk latent cache
    assert not (WORKSPACE / "adaptors" / "tiny_tiny-sd" / f"{experiment}_lora").exists()


def test_sigterm_from_the_lab_saves_the_adapter_before_sigkill_and_ends_stopped(lab_job, tiny_sd, star_folder, tmp_path):
    """The current Lab's Stop: stop flag, SIGTERM, and SIGKILL 3 s later."""
    experiment, job = lab_job
    task_job(job, experiment, tiny_sd, star_folder, tmp_path / "output", num_train_epochs=1000, eval_prompt="")
    env = {**os.environ, "_TFL_JOB_ID": job.id, "_TFL_EXPERIMENT_ID": experiment, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, str(ROOT / "main.py")], env=env, cwd=tmp_path, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        other = asyncio.run(Job.get(job.id, experiment))
        while process.poll() is None and "current_metrics" not in asyncio.run(other.get_job_data()):
            time.sleep(0.1)  # until training has reported its first loss
        asyncio.run(other.update_job_data_field("stop", True))  # what the Lab does, then:
        os.killpg(process.pid, signal.SIGTERM)  # the Lab terminates the process tree
        try:
            process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        output = process.communicate()[0]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    status, progress, data = job_state(job, experiment)
    assert status == "STOPPED" and data["completion_status"] == "stopped", output
    assert data["stop_reason"] in ("terminated (SIGTERM)", "stopped from the Lab")  # whichever it saw first
    (model,) = saved_models(data)
    info = json.loads((model / "tlab_adaptor_info.json").read_text())
    assert (model / "pytorch_lora_weights.safetensors").is_file()
    assert info["stopped_early"] is True and 0 < info["steps_trained"] < 4000
    assert progress < 100


def test_resume_lookup_finds_the_checkpoint_the_lab_names(monkeypatch, lab_job, tmp_path):
    experiment, parent = lab_job
    monkeypatch.setenv("_TFL_EXPERIMENT_ID", experiment)
    monkeypatch.setenv("_TFL_JOB_ID", parent.id)
    reporter = LabReporter(connect_lab(), TASK)
    assert reporter.checkpoint_to_resume() is None  # not a resumed job
    checkpoint = tmp_path / "step_4"
    checkpoint.mkdir()
    (checkpoint / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    reporter.save_checkpoint(checkpoint, "step_4")
    # the user resumes: the Lab makes a new job naming the parent's checkpoint
    child = asyncio.run(asyncio.run(Experiment.create_or_get(experiment)).create_job())
    asyncio.run(child.update_job_data_field("parent_job_id", parent.id))
    asyncio.run(child.update_job_data_field("resumed_from_checkpoint", "step_4"))
    monkeypatch.setenv("_TFL_JOB_ID", child.id)
    found = LabReporter(connect_lab(), TASK).checkpoint_to_resume()
    assert found is not None and (found / "pytorch_lora_weights.safetensors").read_bytes() == b"weights"
    assert Reporter().checkpoint_to_resume() is None


def test_task_yaml_is_generated_from_the_schema_and_importable():
    import yaml

    assert manifest.main(["--check"]) == 0
    task = yaml.safe_load((ROOT / "task.yaml").read_text())
    # the keys the Lab's task.yaml schema allows (it forbids others)
    assert set(task) <= {"name", "resources", "envs", "setup", "run", "github_repo_url", "github_repo_dir",
                         "github_repo_branch", "parameters", "sweeps", "minutes_requested"}
    assert task["run"] == "python -m diffusion_trainer.launch" and task["setup"] == "bash setup.sh"  # all GPUs
    assert re.fullmatch(r"[\w-]+:\d+", task["resources"]["accelerators"])
    assert task["envs"]["HF_TOKEN"] == "{{secret._HF_TOKEN}}"
    assert task["envs"]["WANDB_API_KEY"] == "{{secret._WANDB_API_KEY}}"
    assert list(task["parameters"]) == list(FIELDS)
    for name, value in task["parameters"].items():
        field = FIELDS[name]
        expected = "" if field.is_required() else field.default
        assert value == expected and type(value) is type(expected), name
    # the defaults as the Lab sends them back (plus the required ones) are valid parameters
    params, warnings = parse_params({**task["parameters"], "adaptor_name": "x", "model_name": "m",
                                     "dataset_name": "d"})
    assert warnings == [] and params.prediction_type == "auto"  # the model's own, not a forced epsilon


def test_task_yaml_and_index_json_list_the_same_parameters_and_defaults_but_what_the_plugin_lab_fills_in():
    """The plugin Lab puts model_name, dataset_name and output_dir into the config itself (from the
    experiment's model, the chosen dataset, its tensorboard folder); a plugin form field of that name
    would send its empty default over the Lab's choice. The task Lab has no other way to ask for them."""
    import yaml

    index = json.loads((ROOT / "index.json").read_text())["parameters"]
    task = yaml.safe_load((ROOT / "task.yaml").read_text())["parameters"]
    filled_by_the_plugin_lab = {n for n, f in FIELDS.items() if not (f.json_schema_extra or {}).get("lab_form", True)}
    assert filled_by_the_plugin_lab == {"model_name", "dataset_name", "output_dir"}
    assert set(task) - set(index) == filled_by_the_plugin_lab and set(index) <= set(task)
    for name, entry in index.items():  # the same default, of the same type (a required one starts empty in both)
        assert task[name] == entry["default"] and type(task[name]) is type(entry["default"]), name


def test_a_stopped_task_hands_the_adapter_to_the_lab_before_its_last_checkpoint(monkeypatch, lab_job, tiny_sd,
                                                                               star_folder, tmp_path):
    experiment, job = lab_job
    task_job(job, experiment, tiny_sd, star_folder, tmp_path / "output", num_train_epochs=100, eval_prompt="",
             checkpointing_steps=100)
    monkeypatch.setenv("_TFL_JOB_ID", job.id)
    monkeypatch.setenv("_TFL_EXPERIMENT_ID", experiment)
    handed, seen = [], []
    real_model, real_checkpoint = LabReporter._save_model, LabReporter.save_checkpoint
    monkeypatch.setattr(LabReporter, "_save_model", lambda self, *a: (handed.append("adapter"), real_model(self, *a)))
    monkeypatch.setattr(LabReporter, "save_checkpoint",
                        lambda self, *a: (handed.append("checkpoint"), real_checkpoint(self, *a)))
    monkeypatch.setattr(Reporter, "advance", lambda self, step: seen.append(step))
    monkeypatch.setattr(Reporter, "stop_requested", lambda self: bool(seen) and seen[-1] >= 3)
    assert run_main([]) == 0
    status, _, data = job_state(job, experiment)
    assert status == "STOPPED"
    assert handed == ["adapter", "checkpoint"]  # the adapter first, once; then the checkpoint of the stop
    assert [Path(p).name for p in data["checkpoints"]] == ["checkpoint-3"]


def test_the_jobs_copies_of_checkpoints_keep_the_newest_checkpoints_total_limit(monkeypatch, lab_job, tmp_path):
    experiment, job = lab_job
    monkeypatch.setenv("_TFL_EXPERIMENT_ID", experiment)
    monkeypatch.setenv("_TFL_JOB_ID", job.id)
    lab = connect_lab()
    reporter = LabReporter(lab, TASK)
    for step in (2, 4, 6, 8, 10):
        checkpoint = tmp_path / f"checkpoint-{step}"
        checkpoint.mkdir()
        (checkpoint / "lora_weights.safetensors").write_bytes(b"weights")
        reporter.save_checkpoint(checkpoint, checkpoint.name, 2)
    assert sorted(Path(p).name for p in lab.get_checkpoint_paths()) == ["checkpoint-10", "checkpoint-8"]
    assert [Path(p).name for p in lab.get_job_data()["checkpoints"]] == ["checkpoint-8", "checkpoint-10"]
    reporter.save_checkpoint(tmp_path / "checkpoint-2", "checkpoint-12", 0)  # 0 keeps all
    assert len(lab.get_checkpoint_paths()) == 3


def test_a_remote_checkpoint_is_copied_once_per_machine(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from lab import storage

    source = tmp_path / "bucket" / "checkpoint-4"
    source.mkdir(parents=True)
    (source / "lora_weights.safetensors").write_bytes(b"weights")
    copies = []

    async def copy_dir(src, dest):
        copies.append(src)
        import shutil
        shutil.copytree(source, dest)

    monkeypatch.setattr(storage, "copy_dir", copy_dir)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    lab = SimpleNamespace(get_checkpoint_to_resume=lambda: "s3://bucket/jobs/7/checkpoints/checkpoint-4/",
                          job=SimpleNamespace(id="8"), update_progress=lambda percent, metrics=None, step=None: None)
    found = [LabReporter(lab, TASK).checkpoint_to_resume() for _ in range(2)]  # two processes of one machine
    assert copies == ["s3://bucket/jobs/7/checkpoints/checkpoint-4/"]
    assert found[0] == found[1] and (found[0] / "lora_weights.safetensors").read_bytes() == b"weights"
    assert found[0].name == "checkpoint-4" and [p.name for p in found[0].parent.iterdir()] == ["checkpoint-4"]


def test_the_validation_loss_is_the_task_jobs_score_and_the_plugin_sweeps_metric(monkeypatch, lab_job, tiny_sd,
                                                                                 star_folder, tmp_path):
    from types import SimpleNamespace

    from diffusion_trainer.lab.reporter import write_sweep_metrics

    experiment, job = lab_job
    task_job(job, experiment, tiny_sd, star_folder, tmp_path / "output", num_train_epochs=1, eval_prompt="",
             validation_split=0.25, checkpointing_steps=0)
    monkeypatch.setenv("_TFL_JOB_ID", job.id)
    monkeypatch.setenv("_TFL_EXPERIMENT_ID", experiment)
    assert run_main([]) == 0
    status, _, data = job_state(job, experiment)
    assert status == "COMPLETE"
    job_dir = Path(asyncio.run(asyncio.run(Job.get(job.id, experiment)).get_dir()))
    (metrics_file,) = (job_dir / "output").rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert data["score"]["val/loss"] == metrics["val/loss"] > 0 and data["score"]["final_loss"] > 0
    # the plugin Lab's sweeps read <output_dir>/metrics.json
    result = SimpleNamespace(steps=3, epochs=1, final_loss=0.5,
                             validation=[(0, {"val/loss": 0.7}), (3, {"val/loss": 0.6})])
    swept = json.loads(write_sweep_metrics(tmp_path, result).read_text())
    assert swept["val/loss"] == swept["eval/loss"] == 0.6 and swept["train/loss"] == 0.5


class JobFileBeingRewritten:
    """The SDK's get_config while the main process rewrites the job's file: empty, then the parameters."""

    def __init__(self, empty_reads: int):
        self.reads, self.empty_reads = 0, empty_reads

    def get_config(self):
        self.reads += 1
        return {} if self.reads <= self.empty_reads else {"num_train_epochs": 3}


def test_another_process_reads_the_job_parameters_again_while_the_main_one_rewrites_the_file(monkeypatch):
    from diffusion_trainer.lab.launch import job_parameters

    monkeypatch.setenv("RANK", "1")
    assert job_parameters(JobFileBeingRewritten(empty_reads=3)) == {"num_train_epochs": 3}
    monkeypatch.setenv("RANK", "0")  # the main process has nothing to wait for: it wrote the file itself
    lab = JobFileBeingRewritten(empty_reads=3)
    assert job_parameters(lab) == {} and lab.reads == 1
