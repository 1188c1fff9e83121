"""Checkpoints in one process: a stop writes one, the newest N are kept, a resume that would not be
the same run is refused by name, a safe change is allowed and said, and leftovers of killed writes
are sorted out by the next run. (Kill -9 trials: test_resume_kill.py.)"""

from __future__ import annotations

import errno
import json
import shutil

import pytest
import torch
from conftest import run_folder, train
from safetensors.torch import load_file

from diffusion_trainer import atomic
from diffusion_trainer.families.sd import StableDiffusion
from diffusion_trainer.outputs import layout as adapter
from diffusion_trainer.reporting import Reporter

# 8 images, batch 2: 4 steps an epoch
RUN = dict(num_train_epochs=3, checkpointing_steps=2, checkpoints_total_limit=2, use_ema=True)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, tiny_sd, star_folder):
    """A run asked to stop after its 7th step (as Ctrl-C or the Lab's Stop would)."""
    tmp = tmp_path_factory.mktemp("stopped")
    patch = pytest.MonkeyPatch()
    seen = []
    patch.setattr(Reporter, "advance", lambda self, step: seen.append(step))
    patch.setattr(Reporter, "stop_requested", lambda self: bool(seen) and seen[-1] >= 7)
    try:
        train(tmp, tiny_sd, star_folder, **RUN)
    finally:
        patch.undo()
    return tmp


def folders(path):
    return sorted(p.name for p in path.iterdir())


def test_a_stop_writes_a_checkpoint_and_only_the_newest_are_kept(stopped_run):
    out = stopped_run / "output"
    checkpoints = run_folder(out)
    assert folders(checkpoints) == ["checkpoint-6", "checkpoint-7"]  # 2, 4, 6 every 2 steps, 7 at the stop
    state = torch.load(checkpoints / "checkpoint-7" / "custom_checkpoint_1.pkl", weights_only=False)
    assert state == {"step": 7, "epoch": 2, "batches_done": 3, "seed": 0}
    files = set(folders(checkpoints / "checkpoint-7"))
    assert {"lora_weights.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
            "custom_checkpoint_0.pkl", "run_parameters.json"} <= files
    assert not any(name.startswith("model") for name in files)  # the LoRA only, not the whole UNet
    info = json.loads((out / "test_lora" / "tlab_adaptor_info.json").read_text())
    assert info["steps_trained"] == 7 and info["stopped_early"]


def copy_run(stopped_run, tmp_path):
    shutil.copytree(stopped_run / "output", tmp_path / "output")


def test_a_resume_that_changes_the_rank_is_refused_by_name(stopped_run, tmp_path, tiny_sd, star_folder, capsys):
    copy_run(stopped_run, tmp_path)
    code, out = train(tmp_path, tiny_sd, star_folder, resume_from_checkpoint="latest", **{**RUN, "lora_r": 8})
    err = capsys.readouterr().err
    assert code == 2 and "lora_r: 4 -> 8" in err and "checkpoint-7" in err
    assert "Loading" not in err  # refused before the model loads


def test_a_resume_on_another_number_of_processes_is_refused_by_name(stopped_run, tmp_path, tiny_sd, star_folder,
                                                                     capsys):
    copy_run(stopped_run, tmp_path)
    record_file = run_folder(tmp_path / "output") / "checkpoint-7" / "run_parameters.json"
    record = json.loads(record_file.read_text())
    assert (record["num_processes"], record["global_batch"]) == (1, 2)  # batch 2 x 1 process x 1 accumulation
    record_file.write_text(json.dumps({**record, "num_processes": 2, "global_batch": 4}))  # as 2 processes make it
    code, out = train(tmp_path, tiny_sd, star_folder, resume_from_checkpoint="latest", **RUN)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "checkpoint-7 was trained on 2 process(es) (global batch 4), and this run has 1" in err
    assert "Resume it with the same number of processes, 2" in err
    assert "Loading" not in err  # refused before the model loads


def test_a_checkpoint_older_than_the_process_record_still_resumes(stopped_run, tmp_path, tiny_sd, star_folder,
                                                                  capsys):
    copy_run(stopped_run, tmp_path)
    record_file = run_folder(tmp_path / "output") / "checkpoint-7" / "run_parameters.json"
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({k: v for k, v in record.items() if k not in ("num_processes", "global_batch")}))
    code, out = train(tmp_path, tiny_sd, star_folder, resume_from_checkpoint="latest", **RUN)
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Resuming from" in err and "step 7 of 12" in err


def test_a_resume_with_more_epochs_continues_from_the_stop(stopped_run, tmp_path, tiny_sd, star_folder, capsys):
    copy_run(stopped_run, tmp_path)
    code, out = train(tmp_path, tiny_sd, star_folder, resume_from_checkpoint="latest", **{**RUN, "num_train_epochs": 4})
    err = capsys.readouterr().err
    assert code == 0, err
    assert "changed setting (allowed): num_train_epochs: 3 -> 4" in err
    checkpoint = run_folder(out) / "checkpoint-7"
    assert f"Resuming from {checkpoint}: step 7 of 16, epoch 2" in err
    info = json.loads((out / "test_lora" / "tlab_adaptor_info.json").read_text())
    assert info["steps_trained"] == 16 and info["epochs_trained"] == 4 and not info["stopped_early"]


def test_resume_from_a_folder_that_is_no_checkpoint_names_the_parameter(tmp_path, tiny_sd, star_folder, capsys):
    code, _ = train(tmp_path, tiny_sd, star_folder, resume_from_checkpoint=str(tmp_path))
    assert code == 2 and "resume_from_checkpoint:" in capsys.readouterr().err


def test_leftovers_of_killed_writes_are_sorted_out(tmp_path):
    def folder(name, marker):
        path = tmp_path / name
        path.mkdir()
        (path / "weights").write_text(marker)
        return path

    # killed between the two renames of a swap: the new adapter complete, the old one moved aside
    folder(".a.old-1", "old")
    folder(".a.ready-1", "new")
    # killed while writing: a half folder beside the adapter in place
    folder("b", "current")
    folder(".b.partial-2", "half")
    # killed after the old one was moved aside but with no complete new one: the old one comes back
    folder(".c.old-3", "previous")
    notes = atomic.recover_leftovers(tmp_path)
    assert folders(tmp_path) == ["a", "b", "c"]
    assert [(tmp_path / n / "weights").read_text() for n in "abc"] == ["new", "current", "previous"]
    assert len(notes) >= 3


def test_output_folders_get_the_users_permissions(tmp_path, tiny_sd, star_folder):
    code, out = train(tmp_path, tiny_sd, star_folder, num_train_epochs=1)
    assert code == 0
    expected = 0o777 & ~atomic._current_umask()
    assert (out / "test_lora").stat().st_mode & 0o777 == expected
    assert (run_folder(out) / "checkpoint-4").stat().st_mode & 0o777 == expected


def test_a_full_disk_at_save_keeps_the_weights_in_a_named_fallback(tmp_path, tiny_sd, star_folder, monkeypatch,
                                                                   capsys):
    real_save = StableDiffusion.save_adapter
    output = tmp_path / "output"

    def save(self, directory, metadata):
        if output in directory.parents:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(self, directory, metadata)

    real_commit = atomic.commit

    def commit(staging, target, *args):  # the disk is full by the last checkpoint too
        if target.name == "checkpoint-4":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_commit(staging, target, *args)

    monkeypatch.setattr(StableDiffusion, "save_adapter", save)
    monkeypatch.setattr(atomic, "commit", commit)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    code, out = train(tmp_path, tiny_sd, star_folder, num_train_epochs=1, checkpointing_steps=2)
    err = capsys.readouterr().err
    assert code == 1 and "No space left on device" in err
    checkpoints = run_folder(out)
    assert "Could not write the checkpoint at step 4" in err and f"last good one is {checkpoints / 'checkpoint-2'}" in err
    assert folders(checkpoints) == ["checkpoint-2"]  # the failed write left nothing behind
    rescued = list((tmp_path / "tmp" / "diffusion_trainer_rescued").iterdir())
    assert len(rescued) == 1 and str(rescued[0]) in err
    assert load_file(rescued[0] / adapter.WEIGHTS_NAME)
    assert not (out / "test_lora").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_sd, star_folder):
    """One epoch (4 steps) under a linear schedule and random flips, checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("finished")
    code, _ = train(tmp, tiny_sd, star_folder, **FINISHED)
    assert code == 0
    return tmp


FINISHED = dict(num_train_epochs=1, checkpointing_steps=2, lr_scheduler="linear", random_flip=True, cache_latents=True)


def test_a_resume_with_more_epochs_follows_the_new_schedule_from_its_first_step(finished_run, tmp_path, tiny_sd,
                                                                               star_folder, capsys, monkeypatch):
    from diffusion_trainer.run import trace

    copy_run(finished_run, tmp_path)
    monkeypatch.setenv(trace.TRACE_ENV, str(tmp_path / "trace"))
    code, _ = train(tmp_path, tiny_sd, star_folder, resume_from_checkpoint="latest",
                    **{**FINISHED, "num_train_epochs": 2})
    err = capsys.readouterr().err
    assert code == 0, err
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "trace" / "rank0.jsonl").read_text().splitlines()]
    # linear from 1e-3 to 0 over the new 8 steps, from step 5 on: no step at the old schedule's end (0)
    assert lrs == pytest.approx([(8 - k) / 8 * 1e-3 for k in range(4, 8)])
    assert "follows this run's 8 steps from step 5 on: learning rate 0.0005 (the checkpoint's schedule had 0)" in err


def test_a_resume_that_toggles_cache_latents_under_augmentation_is_refused(finished_run, tmp_path, tiny_sd,
                                                                          star_folder, capsys):
    copy_run(finished_run, tmp_path)
    code, _ = train(tmp_path, tiny_sd, star_folder, resume_from_checkpoint="latest",
                    **{**FINISHED, "num_train_epochs": 2, "cache_latents": False})
    err = capsys.readouterr().err
    assert code == 2 and "cache_latents: True -> False (with random augmentation, random_flip" in err
    assert "Loading" not in err
