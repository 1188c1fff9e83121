"""kohya-style folders (`<repeats>_<name>/`) and dataset_repeats: the captions they give, the samples
an epoch, the step count announced and run, each process's share, and the folder names refused."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import quick_params, run_folder, run_main, write_config
from PIL import Image
from safetensors.torch import load_file

from diffusion_trainer.data.buckets import BucketBatchSampler
from diffusion_trainer.data.cache import CachedSamples, MemoryLatents, Variant
from diffusion_trainer.data.images import Augmentation
from diffusion_trainer.data.samples import build_samples
from diffusion_trainer.data.sources import load_records
from diffusion_trainer.errors import InputError
from diffusion_trainer.params import parse_params
from diffusion_trainer.run.trace import TRACE_ENV


def kohya_folder(root: Path, layout: dict[str, list[tuple[tuple[int, int], str | None]]]) -> Path:
    """{subfolder: [((width, height), caption or None)]}: images in subfolders, some captioned."""
    for sub, images in layout.items():
        folder = root / sub if sub else root
        folder.mkdir(parents=True, exist_ok=True)
        for n, (size, caption) in enumerate(images):
            gradient = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :, None].repeat(size[1], 0)
            pixels = np.concatenate([gradient, np.full_like(gradient, 40 * n), 255 - gradient], axis=2)
            Image.fromarray(pixels).save(folder / f"img{n}.png")
            if caption is not None:
                (folder / f"img{n}.txt").write_text(caption)
    return root


def augmentation(**overrides) -> Augmentation:
    values = {"adaptor_name": "a", "model_name": "m/m", "dataset_name": "d", "resolution": 64, **overrides}
    return Augmentation.of(parse_params(values)[0])


def test_an_uncaptioned_kohya_folder_takes_its_name_as_caption_and_its_repeats(tmp_path):
    data = kohya_folder(tmp_path / "dogs", {"3_sks dog": [((64, 64), None), ((64, 64), "sks dog, on grass")],
                                            "1_dog": [((64, 64), None)] * 3})
    notes: list[str] = []
    records = load_records(str(data), "image", "text", trigger_word="sks", notes=notes)
    assert records["text"] == ["dog"] * 3 + ["sks dog", "sks dog, on grass"]  # a caption file still wins
    assert notes == ["Captions: 1 from .txt files, 4 from folder names.",
                     "kohya-style folders (images x repeats): 1_dog (3 x 1), 3_sks dog (2 x 3): 9 samples an epoch."]
    samples = build_samples(records, "image", "text", "sks", augmentation(), 0, False, dataset_repeats=2)
    assert len(samples) == 18 and samples.image_count == 5  # (3 x 1 + 2 x 3) x 2
    per_image = Counter(samples.draws[k][0] for k in range(len(samples)))
    assert [per_image[i] for i in range(5)] == [2, 2, 2, 6, 6]
    # the trigger word goes in front of a folder name without it, once
    assert Counter(samples.captions) == {"sks dog": 12, "sks dog, on grass": 6}


def test_a_repeated_image_is_a_new_draw_of_its_augmentation(tmp_path):
    data = kohya_folder(tmp_path / "d", {"4_thing": [((96, 64), "a thing")]})
    samples = build_samples(load_records(str(data), "image", "text"), "image", "text", "",
                            augmentation(random_flip=True, center_crop=False), 0, False)
    pixels = [samples[k]["pixel_values"] for k in range(4)]
    assert len({tuple(p[0, 0, :8].tolist()) for p in pixels}) > 2  # other crops (and flips), not one repeated
    # from the latent cache: an image's repeats take different cached variants within one epoch
    store = MemoryLatents([[Variant(torch.full((8, 8, 8), float(v)), (64, 96), (0, v)) for v in range(4)]])
    cached = CachedSamples(store, samples)
    for epoch in (1, 2):
        cached.set_epoch(epoch)
        assert sorted(int(cached[k]["latent_params"][0, 0, 0]) for k in range(4)) == [0, 1, 2, 3]


def test_two_processes_get_exact_disjoint_shares_of_the_repeated_samples(tmp_path):
    # 5 square images x 3 + 2 wide x 2 + 1 tall x 1 at batch 2: buckets of 15, 4 and 1 samples
    data = kohya_folder(tmp_path / "d", {"3_square": [((128, 128), "s")] * 5, "2_wide": [((192, 128), "w")] * 2,
                                         "1_tall": [((128, 192), "t")]})
    samples = build_samples(load_records(str(data), "image", "text"), "image", "text", "",
                            augmentation(resolution=128), 0, True)
    assert len(samples) == 20 and len(set(samples.targets)) == 3
    for epoch in (1, 2):
        samples.set_epoch(epoch)
        ranks = [BucketBatchSampler(samples, 2, 7, 2, k) for k in (0, 1)]
        shares = [list(rank) for rank in ranks]
        plan = ranks[0].epoch_plan(epoch)
        assert shares == [plan[0::2], plan[1::2]] and [len(r) for r in ranks] == [len(s) for s in shares] == [6, 6]
        trained = [i for share in shares for batch in share for i in batch]
        assert set(trained) == set(range(20))  # every sample, repeats included, at least once an epoch
        for batch in plan:
            assert len({samples.targets[i] for i in batch}) == 1
        times = Counter(samples.draws[i][0] for i in trained)  # per image: at least its repeats
        assert all(times[image] >= repeats for image, repeats in enumerate(samples.repeats))


def test_repeats_change_the_step_count_announced_and_run(tmp_path, tiny_sd, monkeypatch, capsys):
    # 2 images x 3 + 1 image x 1 = 7 samples, times dataset_repeats 2 = 14; batch 4: 4 steps an epoch
    data = kohya_folder(tmp_path / "data", {"3_sks star": [((64, 64), None), ((64, 64), "sks star, red")],
                                            "1_star": [((64, 64), None)]})
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "trace"))
    config = write_config(tmp_path / "run.json", quick_params(tiny_sd, data, tmp_path / "output", train_batch_size=4,
                                                              num_train_epochs=2, dataset_repeats=2, lora_r=2))
    assert run_main(["--config", str(config)]) == 0
    err = "".join(capsys.readouterr())
    assert "Training 3 images (14 samples an epoch with repeats) for 8 optimizer steps (2 epochs" in err
    assert re.findall(r"Done in .*?: (\d+) optimizer steps", err) == ["8"]
    lines = [json.loads(line) for line in (tmp_path / "trace" / "rank0.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1] * 4 + [2] * 4
    for epoch in (1, 2):
        assert {i for line in lines if line["epoch"] == epoch for i in line["indices"]} == set(range(14))


@pytest.mark.parametrize("name, why", [("0_dog", "asks for 0 repeats"), ("x_dog", "is not named <repeats>_<name>"),
                                       ("5_", "has no name after the repeats")])
def test_a_bad_kohya_folder_name_is_refused_by_name_before_loading(tmp_path, name, why):
    data = kohya_folder(tmp_path / "d", {"10_sks dog": [((64, 64), None)], name: [((64, 64), "a dog")]})
    with pytest.raises(InputError, match=re.escape(f"'{name}' {why}")):
        load_records(str(data), "image", "text")


def test_bad_folders_and_repeats_exit_2_naming_them(tmp_path, tiny_sd, capsys):
    data = kohya_folder(tmp_path / "d", {"10_sks dog": [((64, 64), None)], "0_cat": [((64, 64), None)]})
    config = write_config(tmp_path / "run.json", quick_params(tiny_sd, data, tmp_path / "output"))
    assert run_main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "'0_cat' asks for 0 repeats" in err and not (tmp_path / "output").exists()
    config = write_config(tmp_path / "run.json", quick_params(tiny_sd, data, tmp_path / "output", dataset_repeats=0))
    assert run_main(["--config", str(config)]) == 2
    assert "dataset_repeats: must be greater than or equal to 1" in capsys.readouterr().err


def test_a_resume_mid_epoch_with_repeats_ends_with_the_same_adapter(tmp_path, tiny_sd, capsys):
    # 7 samples (2 images x 3 + 1 x 1), batch 2: 4 steps an epoch; checkpoint-6 is mid-epoch 2, and each
    # repeat is its own flip draw, so a resume that miscounted samples would train other batches
    data = kohya_folder(tmp_path / "data", {"3_sks star": [((64, 64), None), ((64, 64), "sks star, red")],
                                            "1_star": [((64, 64), None)]})
    settings = dict(num_train_epochs=2, checkpointing_steps=3, random_flip=True, lora_r=2)
    config = write_config(tmp_path / "run.json", quick_params(tiny_sd, data, tmp_path / "full", **settings))
    assert run_main(["--config", str(config)]) == 0
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    checkpoints = run_folder(tmp_path / "resumed")
    for checkpoint in checkpoints.iterdir():
        if checkpoint.name != "checkpoint-6":
            shutil.rmtree(checkpoint)
    config = write_config(tmp_path / "resume.json", quick_params(tiny_sd, data, tmp_path / "resumed",
                                                                 resume_from_checkpoint="latest", **settings))
    capsys.readouterr()
    assert run_main(["--config", str(config)]) == 0
    assert f"Resuming from {checkpoints / 'checkpoint-6'}: step 6 of 8, epoch 2" in capsys.readouterr().err
    full, resumed = (load_file(tmp_path / o / "test_lora" / "pytorch_lora_weights.safetensors")
                     for o in ("full", "resumed"))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
