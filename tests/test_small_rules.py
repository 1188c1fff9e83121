"""The small rules a user meets at the edges (issue 17, item 7): each odd input gets a clear message
naming what is wrong, or follows a rule the README states."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import datasets
import pytest
import torch
from conftest import quick_params, run_main, train, write_config
from PIL import Image
from safetensors.torch import load_file

from diffusion_trainer.data.buckets import bucket_targets
from diffusion_trainer.data.check import resize_notes
from diffusion_trainer.data.sources import load_records
from diffusion_trainer.errors import InputError
from diffusion_trainer.outputs.layout import INFO_NAME, WEIGHTS_NAME
from diffusion_trainer.params import parse_params


def config_text(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.json"
    path.write_text(text)
    return path


# --- parameters ----------------------------------------------------------------------------------

def test_json_true_is_not_a_number_and_infinity_or_nan_are_not_finite(tmp_path, capsys):
    base = json.dumps(quick_params(tmp_path / "model", tmp_path / "data", tmp_path / "out"))[:-1]
    config = config_text(tmp_path, base + ', "seed": true, "learning_rate": NaN, "max_grad_norm": Infinity, '
                         '"adam_epsilon": -Infinity, "train_batch_size": false}')
    assert run_main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "seed: must be a number, not true" in err
    assert "train_batch_size: must be a number, not false" in err
    for name in ("learning_rate", "max_grad_norm", "adam_epsilon"):
        assert f"{name}: must be a finite number" in err
    assert "must be less than or equal" not in err
    assert not (tmp_path / "out").exists()


def test_a_nan_typed_in_a_form_is_not_finite_either(tmp_path, capsys):
    config = config_text(tmp_path, json.dumps(quick_params(tmp_path / "m", tmp_path / "d", tmp_path / "o",
                                                           learning_rate="nan", huber_c=" inf ")))
    assert run_main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "learning_rate: must be a finite number" in err and "huber_c: must be a finite number" in err


def test_an_empty_output_dir_from_a_form_means_the_default_output_folder():
    raw = {"adaptor_name": "a", "model_name": "m", "dataset_name": "d"}
    assert parse_params({**raw, "output_dir": ""})[0].output_dir == "./output"
    assert parse_params({**raw, "output_dir": "  "})[0].output_dir == "./output"
    assert parse_params({**raw, "output_dir": "runs"})[0].output_dir == "runs"


# --- the command line ----------------------------------------------------------------------------

def test_an_unknown_command_line_option_is_an_error_not_a_demo_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_main(["--cofnig", "run.json"]) == 2
    err = capsys.readouterr().err
    assert "unknown argument(s) --cofnig run.json" in err and "did you mean --config?" in err
    assert list(tmp_path.iterdir()) == []  # no demo ran


# --- what a dataset folder holds -----------------------------------------------------------------

def captioned(folder: Path, name: str, caption: str, size: tuple[int, int] = (40, 24), caption_name: str = "") -> Path:
    """An image `name` and its caption (`caption_name`, else the image's stem + .txt)."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 40, 90)).save(folder / name)
    (folder / (caption_name or Path(name).stem + ".txt")).write_text(caption)
    return folder / name


def listed(folder: Path, **options) -> dict[str, str]:
    records = load_records(str(folder), "image", "text", **options)
    raw = records.cast_column("image", datasets.Image(decode=False))
    return {Path(item["path"]).relative_to(folder).as_posix(): text for item, text in zip(raw["image"], raw["text"])}


def test_hidden_files_and_folders_are_not_images(tmp_path):
    captioned(tmp_path, "a.png", "a red square")
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")  # what macOS leaves
    (tmp_path / "._a.txt").write_bytes(b"\x00\x05\x16\x07")
    captioned(tmp_path / ".ipynb_checkpoints", "b.png", "a notebook's copy")
    captioned(tmp_path / "__MACOSX", "._c.png", "resource fork")
    assert listed(tmp_path) == {"a.png": "a red square"}


def test_caption_extensions_match_in_any_case(tmp_path):
    captioned(tmp_path, "B.JPG", "an upper-case pair", caption_name="B.TXT")
    captioned(tmp_path, "c.png", "a mixed pair", caption_name="c.Txt")
    assert listed(tmp_path) == {"B.JPG": "an upper-case pair", "c.png": "a mixed pair"}


def test_two_images_sharing_one_caption_are_refused_by_name(tmp_path):
    captioned(tmp_path, "a.png", "a caption for two")
    captioned(tmp_path, "a.jpg", "a caption for two")
    captioned(tmp_path, "b.png", "b alone")
    with pytest.raises(InputError, match=r"a\.jpg, a\.png in .* share one caption file a\.txt"):
        load_records(str(tmp_path), "image", "text")
    problems: list[str] = []  # as a run collects them: refused unless skip_bad_images, named either way
    assert len(load_records(str(tmp_path), "image", "text", problems=problems)) == 1
    assert problems == [f"a.jpg, a.png in {tmp_path} share one caption file a.txt; give each image its own "
                        "(rename all but one)"]


def test_an_output_folder_inside_the_dataset_is_not_listed_but_the_dataset_itself_is(tmp_path):
    captioned(tmp_path / "data", "a.png", "a")
    captioned(tmp_path / "data" / "output" / "eval_images" / "x", "final.png", "an eval image")
    assert listed(tmp_path / "data", skip_folders=(tmp_path / "data" / "output",)) == {"a.png": "a"}
    # an output folder above the dataset (output_dir "." and dataset "./data") leaves it whole
    assert len(listed(tmp_path / "data", skip_folders=(tmp_path,))) == 2


# --- one awkward run, shared by the tests below ---------------------------------------------------

@pytest.fixture(scope="module")
def awkward_run(tiny_sd, star_folder, tmp_path_factory):
    """A run whose dataset holds its own output folder (with a captioned image in it), a tiny image
    and a long strip (10 images, 4 batches of 3 or fewer), accumulating over more batches than an
    epoch has, under umask 002: (exit status, stderr, output folder)."""
    root = tmp_path_factory.mktemp("awkward")
    data = root / "data"
    shutil.copytree(star_folder, data)
    captioned(data / "output" / "eval_images", "stray.png", "an eval image an earlier run left")
    captioned(data, "tiny.png", "a tiny image", size=(16, 16))
    captioned(data, "strip.png", "a long strip", size=(700, 48))
    config = write_config(root / "run.json", quick_params(
        tiny_sd, data, data / "output", num_train_epochs=2, checkpointing_steps=1, cache_memory_budget_mb=0,
        train_batch_size=3, gradient_accumulation_steps=7))
    err = io.StringIO()
    mask = os.umask(0o002)
    try:
        with contextlib.redirect_stderr(err):
            code = run_main(["--config", str(config)])
    finally:
        os.umask(mask)
    return code, err.getvalue(), data / "output"


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder no file can be written to: by its mode, or for root (whom modes do not stop) a
    read-only tmpfs mounted on it."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    mounted = False
    if os.access(folder, os.W_OK):
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                                 capture_output=True).returncode == 0
        if not mounted:
            pytest.skip("no read-only folder can be made here (root, and mount is not allowed)")
    yield folder
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)
    folder.chmod(0o755)


def test_the_awkward_run_trains(awkward_run):
    code, err, output = awkward_run
    assert code == 0, err
    assert (output / "test_lora" / WEIGHTS_NAME).is_file()


def test_the_output_folder_inside_the_dataset_is_not_trained_on(awkward_run):
    assert "Training 10 images" in awkward_run[1]


def test_images_upscaled_or_cropped_a_lot_are_named_in_a_note(awkward_run):
    err = awkward_run[1]
    assert "Note: 2 image(s) are resized a lot for training" in err
    assert "tiny.png (16x16): upscaled 4.0x to fit 64x64" in err
    assert "strip.png (700x48): cropped to 6.9% of itself to fit 64x64" in err


def test_images_are_noted_against_their_bucket_with_bucketing():
    sizes = [(48, 700), (250, 260), (20, 30)]  # (height, width)
    assert resize_notes(["wide.png", "fine.png", "small.png"], sizes, bucket_targets(sizes, 256)) == [
        "wide.png (700x48): upscaled 4.0x and cropped to 13.7% of itself to fit 384x192",
        "small.png (30x20): upscaled 10.7x to fit 320x192"]


def test_accumulating_over_more_batches_than_an_epoch_has_is_announced_as_clamped(awkward_run):
    err = awkward_run[1]
    assert ("gradient_accumulation_steps=7 is more than the 4 batches of an epoch: each optimizer step "
            "accumulates those 4") in err
    assert "(2 epochs, batch 3 x 4 accumulation)" in err


def test_a_clamped_accumulation_trains_exactly_as_the_clamped_value(tiny_sd, star_folder, tmp_path):
    """8 images in batches of 3: 3 batches an epoch; asking for 5 trains as 3 (the loss divided by 3)."""
    weights = []
    for accumulation in (5, 3):
        code, output = train(tmp_path / str(accumulation), tiny_sd, star_folder, train_batch_size=3,
                             gradient_accumulation_steps=accumulation, checkpointing_steps=0)
        assert code == 0
        weights.append(load_file(str(output / "test_lora" / WEIGHTS_NAME)))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


# --- export --------------------------------------------------------------------------------------

def damaged_copy(adapter: Path, folder: Path, weights: bytes) -> Path:
    folder.mkdir()
    (folder / INFO_NAME).write_text((adapter / INFO_NAME).read_text())
    (folder / WEIGHTS_NAME).write_bytes(weights)
    return folder


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_export_names_a_damaged_diffusers_file(awkward_run, tmp_path, capsys, damage):
    adapter = awkward_run[2] / "test_lora"
    good = (adapter / WEIGHTS_NAME).read_bytes()
    weights = {"truncated": good[: len(good) * 2 // 3], "garbage": b"\x89PNG not a LoRA", "empty": b""}[damage]
    folder = damaged_copy(adapter, tmp_path / damage, weights)
    for form in ("kohya", "diffusers"):
        assert run_main(["export", str(folder), "--format", form]) == 2
        err = capsys.readouterr().err
        assert f"{folder / WEIGHTS_NAME} is damaged or not a safetensors file" in err
        assert "Traceback" not in err
    assert (folder / WEIGHTS_NAME).read_bytes() == weights


def test_export_refuses_a_folder_as_output(awkward_run, tmp_path, capsys):
    adapter = awkward_run[2] / "test_lora"
    for form in ("kohya", "diffusers"):
        assert run_main(["export", str(adapter), "--format", form, "--output", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert f"--output: '{tmp_path}' is a folder; give the file to write" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_export_says_a_read_only_target_cannot_be_written(awkward_run, read_only_folder, capsys):
    adapter = awkward_run[2] / "test_lora"
    for form in ("kohya", "diffusers"):
        target = read_only_folder / f"{form}.safetensors"
        assert run_main(["export", str(adapter), "--format", form, "--output", str(target)]) == 2
        err = capsys.readouterr().err
        assert f"--output: '{target}' cannot be written" in err
        assert "could not be converted" not in err and "Traceback" not in err


def test_every_safetensors_written_gets_the_users_umask(awkward_run, tmp_path):
    code, _, output = awkward_run
    written = sorted(output.rglob("*.safetensors"))
    kinds = {"adapter": output / "test_lora", "checkpoint": output / "checkpoints", "cache": output / "cache"}
    assert all(any(f.is_relative_to(folder) for f in written) for folder in kinds.values()), written
    assert {f.relative_to(output).as_posix(): oct(f.stat().st_mode & 0o777) for f in written} == {
        f.relative_to(output).as_posix(): "0o664" for f in written}  # umask 002
    mask = os.umask(0o027)
    try:
        assert run_main(["export", str(output / "test_lora"), "--output", str(tmp_path / "e.safetensors")]) == 0
    finally:
        os.umask(mask)
    assert oct((tmp_path / "e.safetensors").stat().st_mode & 0o777) == "0o640"
