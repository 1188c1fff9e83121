"""Prior preservation (DreamBooth): class images drawn once with the base model and kept, a drawing
that resumes where it stopped, batches pairing instance and class samples, the two losses logged
and weighed, and bad class folders refused before anything loads."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from conftest import train
from PIL import Image

from diffusion_trainer.data.prior import PairedSamples, class_pools, merged, missing_names
from diffusion_trainer.errors import Stopped

QUICK = {"max_train_steps": 1, "checkpointing_steps": 0, "cache_latents": False, "cache_text_embeddings": False,
         "eval_num_inference_steps": 1, "eval_guidance_scale": 1.0, "num_class_images": 2, "class_prompt": "a star"}


def step_metrics(err: str) -> dict[str, float]:
    """The last progress line's metrics ("step 1/1 loss=… loss/instance=…")."""
    line = [line for line in err.splitlines() if line.startswith("step ")][-1]
    return {k: float(v) for k, v in re.findall(r"(\S+)=(\S+)", line)}


def test_class_images_are_drawn_once_kept_and_their_loss_logged_and_weighed(tmp_path, tiny_sd, star_folder,
                                                                           capfd, monkeypatch):
    from diffusion_trainer.run import loop

    seen = []
    real_merged = loop.merged
    monkeypatch.setattr(loop, "merged", lambda batch: seen.append(real_merged(batch)) or seen[-1])
    class_dir = tmp_path / "class"
    code, _ = train(tmp_path / "a", tiny_sd, star_folder, class_data_dir=str(class_dir), **QUICK)
    err = capfd.readouterr().err
    assert code == 0, err
    drawn = sorted(p.name for p in class_dir.iterdir())
    assert drawn == ["class_00000.png", "class_00001.png"]
    assert "drawing 2 class image(s)" in err
    first = step_metrics(err)
    assert first["loss"] == pytest.approx(first["loss/instance"] + first["loss/prior"], rel=1e-3)
    batch, instances = seen[0]  # a batch of 2 instance rows, then their 2 class partners
    assert instances == 2 and batch["caption"][2:] == ["a star", "a star"]
    assert all("sks" in c for c in batch["caption"][:2]) and batch["pixel_values"].shape[0] == 4

    stamps = {p.name: p.stat().st_mtime_ns for p in class_dir.iterdir()}
    code, _ = train(tmp_path / "b", tiny_sd, star_folder, class_data_dir=str(class_dir), prior_loss_weight=2.0, **QUICK)
    err = capfd.readouterr().err
    assert code == 0, err
    assert "drawing" not in err and {p.name: p.stat().st_mtime_ns for p in class_dir.iterdir()} == stamps
    second = step_metrics(err)  # the same first step, weighed twice
    assert second["loss/instance"] == pytest.approx(first["loss/instance"], rel=1e-4)
    assert second["loss/prior"] == pytest.approx(first["loss/prior"], rel=1e-4)
    assert second["loss"] == pytest.approx(first["loss/instance"] + 2 * first["loss/prior"], rel=1e-3)


def test_prior_loss_weight_0_turns_prior_preservation_off(tmp_path, tiny_sd, star_folder, capfd):
    """Decided: weight 0 is a run without class images (the folder is not read, none is drawn),
    not a run that computes a class loss only to multiply it by 0."""
    class_dir = tmp_path / "class"
    code, _ = train(tmp_path / "a", tiny_sd, star_folder, class_data_dir=str(class_dir), prior_loss_weight=0.0,
                    **QUICK)
    err = capfd.readouterr().err
    assert code == 0, err
    assert "prior preservation is off" in err and not class_dir.exists()
    assert set(step_metrics(err)) == {"loss", "lr"}


def test_an_interrupted_drawing_resumes_with_the_same_images(tmp_path, tiny_sd, monkeypatch):
    from diffusion_trainer.families import family_for
    from diffusion_trainer.reporting import Reporter
    from diffusion_trainer.run import class_images

    monkeypatch.setattr(class_images, "GENERATE_BATCH", 1)
    family = family_for(str(tiny_sd)).load(str(tiny_sd), torch.float32)
    settings = class_images.DrawSettings("a star", 0, 1, 1.0, 64)  # guidance 1: no second pass
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    class_images.generate_class_images(family, missing_names(whole, 2), settings, torch.device("cpu"), Reporter())
    calls = iter([False, True])  # a stop asked after the first image
    with pytest.raises(Stopped):
        class_images.generate_class_images(family, missing_names(cut, 2), settings, torch.device("cpu"), Reporter(),
                                           lambda: next(calls))
    assert sorted(p.name for p in cut.iterdir()) == ["class_00000.png"]  # whole images only
    (cut / "mine.jpg").write_bytes((whole / "class_00000.png").read_bytes())  # the user's own image counts
    rest = missing_names(cut, 3)
    assert [p.name for p in rest] == ["class_00001.png"]
    class_images.generate_class_images(family, rest, settings, torch.device("cpu"), Reporter())
    for name in ("class_00000.png", "class_00001.png"):
        assert (cut / name).read_bytes() == (whole / name).read_bytes(), name


def test_pairs_keep_one_shape_per_batch_and_use_the_class_images_in_turn():
    class Items:
        def __init__(self, targets, tag):
            self.targets, self.captions, self.tag, self.epoch = targets, [tag] * len(targets), tag, 0

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __len__(self):
            return len(self.targets)

        def __getitem__(self, i):
            h, w = self.targets[i]
            return {"index": i, "caption": self.tag, "pixel_values": torch.zeros(3, h, w)}

    square, wide = (64, 64), (64, 128)
    instance = Items([square, wide, square, square, wide], "sks")
    classes = [square, square, square, (128, 64)]  # no class image is wide: all four are cropped to it
    pools = class_pools(instance.targets, classes)
    assert [j for j, _ in pools[square]] == [0, 1, 2] and [j for j, _ in pools[wide]] == [0, 1, 2, 3]
    slot_targets = [shape for pool in pools.values() for _, shape in pool]
    slots, start = {}, 0
    for shape, pool in pools.items():
        slots[shape], start = list(range(start, start + len(pool))), start + len(pool)
    paired = PairedSamples(instance, Items(slot_targets, "a star"), slots)
    used = []
    for epoch in (1, 2):
        paired.set_epoch(epoch)
        items = [paired[i] for i in range(len(paired))]
        assert all(it["pixel_values"].shape == it["class"]["pixel_values"].shape for it in items)
        partners = [it["class"]["index"] for it in items]
        assert len(set(partners)) == len(partners)  # disjoint within an epoch
        used += partners
    assert set(used) == set(range(len(slot_targets)))  # every slot used over two epochs
    batch = torch.utils.data.default_collate([paired[0], paired[2]])
    whole, rows = merged(batch)
    assert rows == 2 and whole["caption"] == ["sks", "sks", "a star", "a star"]
    assert whole["pixel_values"].shape[0] == 4


@pytest.mark.parametrize("case", ["same", "inside", "no_prompt", "negative", "listed_too_few", "broken"])
def test_bad_class_folders_are_named_before_loading(case, tmp_path, tiny_sd, star_folder, capfd):
    data = tmp_path / "data"
    shutil.copytree(star_folder, data)
    overrides = dict(QUICK)
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    if case == "same":
        class_dir, named = data, "class_data_dir"
    elif case == "inside":
        class_dir, named = data / "class", "class_data_dir"
    elif case == "no_prompt":
        overrides["class_prompt"], named = "", "class_prompt"
    elif case == "negative":
        overrides["prior_loss_weight"], named = -1.0, "prior_loss_weight"
    elif case == "listed_too_few":
        Image.new("RGB", (64, 64)).save(class_dir / "dog.png")
        (class_dir / "metadata.jsonl").write_text(json.dumps({"file_name": "dog.png", "text": "a dog"}) + "\n")
        named = "class_data_dir"
    else:
        (class_dir / "class_00000.png").write_bytes(b"not a png")
        named = "class_data_dir"
    code, output = train(tmp_path / "run", tiny_sd, data, class_data_dir=str(class_dir), **overrides)
    err = capfd.readouterr().err
    assert code == 2, err
    assert f"{named}:" in err and "Loading" not in err
    assert not (output / "test_lora").exists()
