"""kill -9 at random moments, resume with resume_from_checkpoint=latest, and end bitwise where the
same run never interrupted ends: adapter, optimizer, LR scheduler, EMA and step count.

Each run is its own process (as a crash would be). The kill moments are random; the seed that drew
them is printed, so a failure can be replayed with KILL_TRIAL_SEED=<seed>. One kill lands inside a
checkpoint write: DIFFUSION_TRAINER_TEST_CHECKPOINT_SLEEP (checkpoint.TEST_SLEEP_ENV) makes that
run pause in each write after its files and before the rename.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import ROOT, quick_params, run_folder, write_config
from safetensors.torch import load_file

from diffusion_trainer.run.checkpoint import PREFIX, TEST_SLEEP_ENV

# 8 images, batch 1, 2 batches per step: 4 steps an epoch, so checkpoints every 3 steps fall
# mid-epoch and mid-way through an accumulation cycle's neighbours.
RUN = dict(train_batch_size=1, gradient_accumulation_steps=2, num_train_epochs=8, checkpointing_steps=3,
           checkpoints_total_limit=2, use_ema=True, ema_decay=0.9, lr_scheduler="cosine", lr_warmup_steps=4,
           caption_dropout_rate=0.3, random_flip=True)
TOTAL_STEPS = 32
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # lighter on a shared machine; the same in every run


def start(config: Path, log: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "main.py", "--config", str(config)], cwd=ROOT,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **THREADS, **env})


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 600.0) -> bool:
    """True once predicate() holds; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    raise TimeoutError("the run neither got there nor ended")


def kill_after(proc: subprocess.Popen, predicate, delay: float) -> bool:
    """SIGKILL `delay` s after predicate() holds; True if the run was still going when killed."""
    if not wait_for(predicate, proc):
        return False
    time.sleep(delay)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return alive


def checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"*/{PREFIX}*"))  # in the run folder(s) under checkpoints/<name>


def writing(folder: Path) -> bool:
    return any(folder.glob(f"*/.{PREFIX}*"))


def state_of(checkpoint: Path) -> dict:
    """Everything in a checkpoint that decides how training goes on."""
    state = {f"lora/{k}": v for k, v in load_file(checkpoint / "lora_weights.safetensors").items()}
    for name in ("optimizer.bin", "scheduler.bin", "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl"):
        state[name] = torch.load(checkpoint / name, weights_only=False)
    return state


def assert_identical(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_runs_killed_at_random_moments_resume_to_the_same_adapter(tmp_path, tiny_sd, star_folder):
    seed = int(os.environ.get("KILL_TRIAL_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    print(f"KILL_TRIAL_SEED={seed}")
    ref = write_config(tmp_path / "ref.json", quick_params(tiny_sd, star_folder, tmp_path / "ref", **RUN))
    fresh = write_config(tmp_path / "fresh.json", quick_params(tiny_sd, star_folder, tmp_path / "out", **RUN))
    resume = write_config(tmp_path / "resume.json", quick_params(tiny_sd, star_folder, tmp_path / "out",
                                                                  resume_from_checkpoint="latest", **RUN))
    folder = tmp_path / "out" / "checkpoints" / "test_lora"

    reference = start(ref, tmp_path / "ref.log")
    killed = []
    # 1: a fresh run, killed at a random moment once its first checkpoint is on disk
    proc = start(fresh, tmp_path / "run1.log")
    killed.append(kill_after(proc, lambda: checkpoints(folder), rng.uniform(0.0, 0.4)))
    # 2: resumed, then killed in the middle of writing a checkpoint
    proc = start(resume, tmp_path / "run2.log", **{TEST_SLEEP_ENV: "1.0"})
    killed.append(kill_after(proc, lambda: writing(folder), rng.uniform(0.1, 0.8)))
    leftover = [p.name for p in folder.glob("*/.*")]
    # 3: resumed, killed at a random moment after its next checkpoint
    seen = {p.name for p in checkpoints(folder)}
    proc = start(resume, tmp_path / "run3.log")
    killed.append(kill_after(proc, lambda: {p.name for p in checkpoints(folder)} - seen, rng.uniform(0.0, 0.3)))
    # 4: resumed to the end
    proc = start(resume, tmp_path / "run4.log")
    assert proc.wait(timeout=900) == 0, (tmp_path / "run4.log").read_text()
    assert reference.wait(timeout=900) == 0, (tmp_path / "ref.log").read_text()

    print("killed while running:", killed, "leftover after the kill in a write:", leftover)
    assert killed[1] and leftover, "the second kill did not land inside a checkpoint write"
    assert sum(killed) >= 2
    log = (tmp_path / "run4.log").read_text()
    run = run_folder(tmp_path / "out")  # the resumes went on in the fresh run's folder
    assert f"Resuming from {run / PREFIX}" in log and f"of {TOTAL_STEPS}, epoch" in log
    assert "leftover temporary folder" in (tmp_path / "run3.log").read_text()
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # the write killed mid-way: cleaned

    adapter = "test_lora/pytorch_lora_weights.safetensors"
    assert_identical(load_file(tmp_path / "ref" / adapter), load_file(tmp_path / "out" / adapter), "adapter")
    last = f"{PREFIX}{TOTAL_STEPS}"
    mine, theirs = state_of(run / last), state_of(run_folder(tmp_path / "ref") / last)
    assert mine["custom_checkpoint_1.pkl"]["step"] == TOTAL_STEPS
    assert_identical(theirs, mine, "final checkpoint")  # optimizer, LR scheduler, EMA, position
    assert len(checkpoints(folder)) == RUN["checkpoints_total_limit"]
