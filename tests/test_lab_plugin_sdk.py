"""The plugin Lab (app <= v0.30.3) with its own SDK, transformerlab 0.0.83 (and, for Stop, the
older all-synchronous 0.0.56), installed by the test setup into a folder of its own
(conftest.plugin_lab_sdk).

That SDK cannot share a process with the venv's newer one, so everything runs in subprocesses
with it first on PYTHONPATH: main.py launched as the Lab's harness launches it, and the job
created, stopped and read back through that SDK (tests/lab_job_tool.py), as that Lab's UI does.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PLUGIN_LAB_SDKS, ROOT

TOOL = Path(__file__).with_name("lab_job_tool.py")


class PluginLab:
    def __init__(self, sdk: Path, home: Path):
        self.workspace = home / "workspace"
        self.env = {**os.environ, "TFL_HOME_DIR": str(home), "TFL_WORKSPACE_DIR": str(self.workspace),
                    "PYTHONPATH": os.pathsep.join([str(sdk), str(ROOT)]), "PYTHONUNBUFFERED": "1"}
        for key in ("_TFL_JOB_ID", "_TFL_EXPERIMENT_ID"):
            self.env.pop(key, None)

    def tool(self, *args: str) -> str:
        out = subprocess.run([sys.executable, str(TOOL), *args], env=self.env, capture_output=True, text=True,
                             check=True).stdout
        return re.search(r"@@(.*?)@@", out).group(1)

    def state(self, job_id: str) -> dict:
        return json.loads(self.tool("state", job_id))

    def launch(self, experiment: str, job_id: str, config: dict) -> subprocess.Popen:
        """As the Lab's plugin harness: config in <workspace>/temp/plugin_input_<job>.json."""
        input_file = self.workspace / "temp" / f"plugin_input_{job_id}.json"
        input_file.parent.mkdir(parents=True, exist_ok=True)
        input_file.write_text(json.dumps({"experiment": {"id": experiment, "name": experiment}, "config": config}))
        return subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--plugin_dir", str(ROOT),
                                 "--input_file", str(input_file), "--experiment_name", experiment],
                                env=self.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture
def plugin_lab(plugin_lab_sdk, tmp_path) -> PluginLab:
    lab = PluginLab(plugin_lab_sdk, tmp_path / "tfl_home")
    lab.workspace.mkdir(parents=True)
    probe = "import inspect, lab; print(list(inspect.signature(lab.lab.update_progress).parameters))"
    used = subprocess.run([sys.executable, "-c", probe], env=lab.env, capture_output=True, text=True, check=True)
    assert used.stdout.strip().splitlines()[-1] == "['progress']"  # really the plugin Lab's SDK, not the venv's
    return lab


def plugin_config(lab: PluginLab, experiment: str, job_id: str, model: Path, dataset: Path, **overrides) -> dict:
    config = {
        "adaptor_name": "old_lab_lora", "model_name": "tiny/tiny-sd", "model_path": str(model),
        "model_architecture": "StableDiffusionPipeline", "dataset_name": str(dataset), "job_id": job_id,
        "template_name": "diffusion", "type": "LoRA", "run_sweeps": "false",
        "output_dir": str(lab.workspace / "experiments" / experiment / "tensorboards"),
        "adaptor_output_dir": str(lab.workspace / "adaptors" / "tiny_tiny-sd" / "old_lab_lora"),
        "num_train_epochs": "500", "train_batch_size": "2", "resolution": "64", "center_crop": "true",
        "learning_rate": "0.001", "lr_warmup_steps": "0", "lora_r": "4", "lora_alpha": "8",
        "eval_prompt": "", "log_to_wandb": "false",
    }
    config.update(overrides)
    return config


@pytest.mark.parametrize("plugin_lab_sdk", PLUGIN_LAB_SDKS, indirect=True)
def test_progress_moves_and_stop_saves_the_adapter_and_ends_stopped(plugin_lab, tiny_sd, star_folder):
    job_id = plugin_lab.tool("create", "old")
    config = plugin_config(plugin_lab, "old", job_id, tiny_sd, star_folder)
    process = plugin_lab.launch("old", job_id, config)
    try:
        progress = 0
        while process.poll() is None and not progress:
            progress = plugin_lab.state(job_id)["progress"]
            time.sleep(0.2)
        # The Stop button writes the flag once; our progress writes race for the same file.
        while process.poll() is None:
            plugin_lab.tool("stop", job_id)
            time.sleep(0.3)
        output = process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:
            process.kill()
    assert progress > 0, output  # the bar moved (a metrics keyword would have raised TypeError)
    assert "could not update the Lab job" not in output
    assert process.returncode == 0, output
    state = plugin_lab.state(job_id)
    assert state["status"] == "STOPPED" and state["job_data"]["completion_status"] == "stopped", output
    assert state["job_data"]["stop_reason"] == "stopped from the Lab"
    adapter = Path(config["adaptor_output_dir"])
    assert (adapter / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((adapter / "tlab_adaptor_info.json").read_text())["stopped_early"] is True
    metrics = json.loads((Path(config["output_dir"]) / "metrics.json").read_text())  # what sweeps rank by
    assert metrics["train/loss"] > 0 and metrics["steps"] > 0


def test_a_failure_ends_failed_with_the_message(plugin_lab, tiny_sd):
    job_id = plugin_lab.tool("create", "old")
    config = plugin_config(plugin_lab, "old", job_id, tiny_sd, Path("/nowhere/at/all"))
    process = plugin_lab.launch("old", job_id, config)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 2, output
    state = plugin_lab.state(job_id)
    assert state["status"] == "FAILED" and state["job_data"]["completion_status"] == "failed"
    assert "dataset_name: there is no folder '/nowhere/at/all'" in state["job_data"]["completion_details"]
