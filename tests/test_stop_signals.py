"""Stopping a standalone run from the terminal: Ctrl-C (SIGINT) or SIGTERM stop at the next
step, the adapter trained so far is saved, and the exit status says which signal it was."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, quick_params, write_config


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_at_a_step_saves_the_adapter_and_exits_128_plus_its_number(sig, status, tiny_sd, star_folder,
                                                                                  tmp_path):
    output = tmp_path / "output"
    # Uncached, one image per batch: the data loader runs worker processes, which the signal
    # reaches too (a terminal's Ctrl-C and the Lab's Stop both signal the whole process group).
    config = write_config(tmp_path / "run.json", quick_params(tiny_sd, star_folder, output, num_train_epochs=1000,
                                                             train_batch_size=1, cache_latents=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith("_TFL_")}
    process = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--config", str(config)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in process.stderr:
            if line.startswith("Training "):  # the loop is about to start
                break
        time.sleep(1)  # the loader's workers are up
        os.killpg(process.pid, sig)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == status, stderr
    assert "stopping after this step and saving the adapter" in stderr
    adapter = output / "test_lora"
    assert (adapter / "pytorch_lora_weights.safetensors").is_file()
    info = json.loads((adapter / "tlab_adaptor_info.json").read_text())
    assert info["stopped_early"] is True and 0 < info["steps_trained"] < 8000
    assert "Stopped early" in stdout


def interrupting(real, after_calls: int):
    """`real`, but the process gets SIGINT (Ctrl-C) at its call number `after_calls`."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == after_calls:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # the handler runs in the main thread meanwhile
        return real(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize(("where", "module", "name"), [
    ("during the data check", "data.check", "inspect_image"),
    ("while the latent cache was encoded", "data.cache", "derived_seed"),
])
def test_ctrl_c_before_training_stops_there_with_nothing_trained(where, module, name, tiny_sd, star_folder,
                                                                 tmp_path, monkeypatch, capsys):
    import importlib

    from conftest import train

    target = importlib.import_module(f"diffusion_trainer.{module}")
    monkeypatch.setattr(target, name, interrupting(getattr(target, name), 3))
    code, output = train(tmp_path, tiny_sd, star_folder, num_train_epochs=1000)
    err = capsys.readouterr().err
    assert code == 130, err
    assert f"Stopped {where}, before training began: nothing was trained or saved." in err
    assert "Training 8 images" not in err and not (output / "test_lora").exists()
    if module == "data.check":
        assert "Loading" not in err  # the model was never loaded
