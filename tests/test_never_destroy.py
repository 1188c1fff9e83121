"""A run never destroys what is not its own, and every failure keeps the trained weights: a dataset or a
foreign folder by the adapter's name is refused, reserved names are refused, two runs keep their
checkpoints apart and cannot write one folder at once, a stopped shorter run writes beside a longer
adapter, a full disk (a real tmpfs) ends in a named rescue folder, damaged checkpoints are named, and
a stop is quick during eval images and during the last checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, quick_params, stop_after_denoising_steps, train, write_config
from safetensors.torch import load_file

from diffusion_trainer.outputs import layout as adapter
from diffusion_trainer.reporting import Reporter
from diffusion_trainer.run import checkpoint

INFO = adapter.INFO_NAME


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def runs_of(output: Path, name: str = "test_lora") -> list[Path]:
    return checkpoint.run_folders(output / "checkpoints" / name)


# --- 17.1: the adapter's name never replaces what is not an adapter -------------------------------

def test_an_adapter_named_like_the_dataset_folder_is_refused_and_the_dataset_kept(tmp_path, tiny_sd, star_folder,
                                                                                  capsys):
    dataset = shutil.copytree(star_folder, tmp_path / "my_images")
    before = files_of(dataset)
    code, _ = train(tmp_path, tiny_sd, dataset, adaptor_name="my_images", output_dir=str(tmp_path))
    err = capsys.readouterr().err
    assert code == 2 and "adaptor_name:" in err and str(dataset) in err and "Loading" not in err
    assert files_of(dataset) == before


@pytest.mark.parametrize("name", ["checkpoints", "logs", "eval_images", "cache"])
def test_a_reserved_adaptor_name_is_refused_by_name(name, tmp_path, tiny_sd, star_folder, capsys):
    output = tmp_path / "output"
    (output / name / "other_lora").mkdir(parents=True)
    (output / name / "other_lora" / "keep.txt").write_text("another run's")
    code, _ = train(tmp_path, tiny_sd, star_folder, adaptor_name=name)
    err = capsys.readouterr().err
    assert code == 2 and "adaptor_name" in err and "reserved" in err
    assert (output / name / "other_lora" / "keep.txt").read_text() == "another run's"


def test_a_folder_this_trainer_did_not_write_is_left_untouched(tmp_path, tiny_sd, star_folder, capsys):
    foreign = tmp_path / "output" / "test_lora"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    code, _ = train(tmp_path, tiny_sd, star_folder)
    err = capsys.readouterr().err
    assert code == 2 and f"'{foreign}' already exists and is not an adapter this trainer wrote" in err
    assert files_of(foreign) == {"notes.txt": b"mine"}


# --- 17.3: runs keep their checkpoints apart, and one run at a time writes a folder ----------------

def test_two_runs_into_one_output_folder_keep_their_checkpoints_apart(tmp_path, tiny_sd, star_folder, capsys):
    code, out = train(tmp_path, tiny_sd, star_folder, num_train_epochs=2, checkpointing_steps=2,
                      checkpoints_total_limit=2)
    assert code == 0
    [first] = runs_of(out)
    kept = {p.name: files_of(p) for p in checkpoint.existing(first)}
    assert sorted(kept) == ["checkpoint-6", "checkpoint-8"]
    code, _ = train(tmp_path, tiny_sd, star_folder, num_train_epochs=1, checkpointing_steps=2,
                    checkpoints_total_limit=2, learning_rate=2e-3)
    assert code == 0
    first_again, second = runs_of(out)
    assert first_again == first and {p.name: files_of(p) for p in checkpoint.existing(first)} == kept
    assert [p.name for p in checkpoint.existing(second)] == ["checkpoint-2", "checkpoint-4"]
    capsys.readouterr()
    # `latest` takes the newest run's newest checkpoint, not the other run's higher step
    code, _ = train(tmp_path, tiny_sd, star_folder, num_train_epochs=2, checkpointing_steps=2,
                    checkpoints_total_limit=2, learning_rate=2e-3, resume_from_checkpoint="latest")
    err = capsys.readouterr().err
    assert code == 0 and f"Resuming from {second / 'checkpoint-4'}: step 4 of 8" in err


def test_a_second_run_into_a_folder_being_written_is_refused_naming_the_first(tmp_path, tiny_sd, star_folder,
                                                                              capsys):
    output = tmp_path / "output"
    output.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = output / ".test_lora.lock"
        lock.write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename, "started": "earlier"}))
        code, _ = train(tmp_path, tiny_sd, star_folder)
        err = capsys.readouterr().err
        assert code == 2 and f"process {holder.pid}" in err and str(lock) in err and "Loading" not in err
        assert lock.is_file()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and taken over, and released at the end
    code, _ = train(tmp_path, tiny_sd, star_folder)
    assert code == 0 and not lock.exists() and (output / "test_lora" / INFO).is_file()


# --- 17.2: a stopped shorter run never replaces a longer adapter, and its checkpoint survives --------

def test_a_stopped_run_short_of_the_adapter_there_writes_beside_it_and_keeps_its_checkpoint(
        tmp_path, tiny_sd, star_folder, monkeypatch, capsys):
    code, out = train(tmp_path, tiny_sd, star_folder, num_train_epochs=2)  # 8 steps
    assert code == 0
    longer = files_of(out / "test_lora")
    seen = []
    monkeypatch.setattr(Reporter, "advance", lambda self, step: seen.append(step))
    monkeypatch.setattr(Reporter, "stop_requested", lambda self: bool(seen) and seen[-1] >= 1)
    code, _ = train(tmp_path, tiny_sd, star_folder, num_train_epochs=2, checkpointing_steps=5)
    err = capsys.readouterr().err
    beside = out / "test_lora-step1"
    assert f"short of the 8-step adapter at {out / 'test_lora'}, which is kept" in err and str(beside) in err
    assert files_of(out / "test_lora") == longer
    assert json.loads((beside / INFO).read_text())["steps_trained"] == 1
    stopped_run = runs_of(out)[-1]  # the first run's final checkpoint is in the folder before it
    assert [p.name for p in checkpoint.existing(stopped_run)] == ["checkpoint-1"]  # the stop's own, not pruned


# --- 17.4: a full disk at the final save keeps the weights (a real small filesystem) -----------------

@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_at_the_final_save_ends_with_the_adapter_in_a_named_rescue_folder(tmp_path, tiny_sd,
                                                                                    star_folder, small_disk):
    rescue_root = tmp_path / "tmp"
    rescue_root.mkdir()
    config = write_config(tmp_path / "run.json", quick_params(tiny_sd, star_folder, small_disk / "output",
                                                             num_train_epochs=6, checkpointing_steps=0,
                                                             cache_latents=True))
    env = {**os.environ, "TMPDIR": str(rescue_root)}
    process = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--config", str(config)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err_lines = []
    for line in process.stderr:
        err_lines.append(line)
        if line.startswith("Training "):
            break
    filler = os.open(small_disk / "filler", os.O_CREAT | os.O_WRONLY)  # the disk fills up while the run trains
    try:
        while os.write(filler, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(filler)
    stdout, rest = process.communicate(timeout=600)
    err = "".join(err_lines) + rest
    assert process.returncode == 1, err
    rescued = list((rescue_root / "diffusion_trainer_rescued").iterdir())
    assert len(rescued) == 1 and f"saved to {rescued[0]} instead" in err and "Traceback" not in err
    assert load_file(rescued[0] / adapter.WEIGHTS_NAME)
    assert json.loads((rescued[0] / INFO).read_text())["steps_trained"] == 24
    assert not (small_disk / "output" / "test_lora").exists()


# --- 17.5: damaged checkpoints are named; `latest` takes the newest that loads -----------------------

@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory, tiny_sd, star_folder):
    tmp = tmp_path_factory.mktemp("checkpointed")
    code, out = train(tmp, tiny_sd, star_folder, num_train_epochs=1, checkpointing_steps=2,
                      checkpoints_total_limit=3)
    assert code == 0
    return out


def damage(output: Path, how: str) -> Path:
    [run] = runs_of(output)
    newest = checkpoint.existing(run)[-1]
    file = newest / {"optimizer": "optimizer.bin", "lora": checkpoint.LORA_NAME, "state": "custom_checkpoint_0.pkl",
                     "record": checkpoint.PARAMETERS_NAME}[how]
    if how == "record":
        file.write_text('{"parameters": {"lora_r": 4,')
    else:
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    return file


@pytest.mark.parametrize("how", ["optimizer", "lora", "state", "record"])
def test_a_damaged_checkpoint_is_named_and_latest_takes_the_one_before(how, checkpointed_run, tmp_path, tiny_sd,
                                                                       star_folder, capsys):
    out = tmp_path / "output"
    shutil.copytree(checkpointed_run, out)
    broken = damage(out, how)
    code, _ = train(tmp_path, tiny_sd, star_folder, num_train_epochs=2, checkpointing_steps=2,
                    checkpoints_total_limit=3, resume_from_checkpoint=str(broken.parent))
    err = capsys.readouterr().err
    assert code == 2 and f"resume_from_checkpoint: {broken}" in err and "Traceback" not in err
    code, _ = train(tmp_path, tiny_sd, star_folder, num_train_epochs=2, checkpointing_steps=2,
                    checkpoints_total_limit=3, resume_from_checkpoint="latest")
    err = capsys.readouterr().err
    assert code == 0, err
    assert str(broken) in err and "Trying the one before it" in err
    assert f"Resuming from {broken.parent.with_name('checkpoint-2')}: step 2 of 8" in err


def test_a_checkpoint_without_its_random_state_resumes_saying_it_is_not_exact(checkpointed_run, tmp_path, tiny_sd,
                                                                                star_folder, capsys):
    out = tmp_path / "output"
    shutil.copytree(checkpointed_run, out)
    [run] = runs_of(out)
    (run / "checkpoint-4" / "random_states_0.pkl").unlink()
    code, _ = train(tmp_path, tiny_sd, star_folder, num_train_epochs=2, checkpointing_steps=2,
                    checkpoints_total_limit=3, resume_from_checkpoint="latest")
    err = capsys.readouterr().err
    assert code == 0 and "Resuming from" in err and "not an exact continuation" in err


# --- 17.6: a stop is quick: between the denoising steps of an eval image, and during the last checkpoint ---

def test_a_stop_during_an_eval_image_ends_it_at_the_next_denoising_step(tmp_path, tiny_sd, star_folder, monkeypatch,
                                                                         capsys):
    denoising_steps = stop_after_denoising_steps(monkeypatch, 200 + 3)  # the "before" image is whole
    code, out = train(tmp_path, tiny_sd, star_folder, num_train_epochs=3, eval_prompt="a sks star",
                      eval_steps=1, eval_num_inference_steps=200)
    err = capsys.readouterr().err
    assert code == 143, err
    assert len(denoising_steps) == 200 + 3  # not 200 + 200
    assert json.loads((out / "test_lora" / INFO).read_text())["steps_trained"] == 4  # no step after the eval
    # drawn before step 1 (before/after shows the base model), and the interrupted image is not kept
    assert [p.name for p in (out / "eval_images" / "test_lora").glob("*.png")] == ["before.png"]


def test_sigterm_during_the_last_checkpoint_exits_143_with_the_adapter_already_saved(tmp_path, tiny_sd, star_folder):
    output = tmp_path / "output"
    config = write_config(tmp_path / "run.json", quick_params(tiny_sd, star_folder, output, num_train_epochs=1,
                                                             checkpointing_steps=100))
    env = {**os.environ, checkpoint.TEST_SLEEP_ENV: "3"}
    process = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--config", str(config)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list(output.glob("checkpoints/test_lora/*/.checkpoint-4.partial-*")):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        assert (output / "test_lora" / INFO).is_file()  # the adapter came first
        process.send_signal(signal.SIGTERM)
        stdout, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, err
    assert "Stopped" in stdout
