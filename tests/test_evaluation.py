"""Evaluation as a user reads it: several prompts at fixed seeds from before step 1, one grid per eval,
every N steps; the validation loss: held out, deterministic, logged and written to metrics.json."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from conftest import train
from PIL import Image
from test_training import tensorboard_scalars

from diffusion_trainer.data.sources import load_records
from diffusion_trainer.demo import shapes
from diffusion_trainer.families import family_for
from diffusion_trainer.params import parse_params
from diffusion_trainer.run import loop, setup
from diffusion_trainer.run.evaluate import parse_prompts
from diffusion_trainer.run.validation import Validation, split_rows


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """Eight stars, each with a caption of its own, so a trained batch tells which images it held."""
    rng = random.Random(5)
    return shapes.write_captioned_folder(tmp_path_factory.mktemp("data") / "numbered",
                                         [(shapes.concept_sample(rng, "sks")[0], f"sks star number {i}")
                                          for i in range(8)])


def test_eval_prompt_takes_lines_or_bars_and_lines_win():
    assert parse_prompts("a sks star | a red circle|") == ("a sks star", "a red circle")
    assert parse_prompts("a sks star\n\na red | blue circle\n") == ("a sks star", "a red | blue circle")
    assert parse_prompts("  ") == ()


def test_prompts_times_seeds_from_before_step_1_and_every_n_steps(tmp_path, tiny_sd, star_folder):
    code, out = train(tmp_path, tiny_sd, star_folder, eval_prompt="a sks star\na red circle", eval_num_images=2,
                      eval_every_n_steps=2, eval_steps=1000, max_train_steps=3, eval_num_inference_steps=1)
    assert code == 0
    folder = out / "eval_images" / "test_lora"
    cells = [f"{tag}_p{p}_s{s}.png" for tag in ("before", "final", "step_000002") for p in (1, 2) for s in (0, 1)]
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(["before.png", "final.png", "step_000002.png", *cells])
    grid = np.asarray(Image.open(folder / "final.png"))
    assert grid.shape == (2 * (64 + 18), 2 * 64, 3)  # two prompts (rows, captioned) x two seeds
    image = {(p, s): np.asarray(Image.open(folder / f"final_p{p}_s{s}.png")) for p in (1, 2) for s in (0, 1)}
    assert (grid[18 + 82:, 64:] == image[2, 1]).all()  # the cell is that prompt at that seed
    assert not (image[1, 0] == image[1, 1]).all() and not (image[1, 0] == image[2, 0]).all()
    assert not (np.asarray(Image.open(folder / "before_p1_s0.png")) == image[1, 0]).all()  # training changed it
    grids = []
    for events in (out / "logs" / "test_lora").rglob("events.out.tfevents.*"):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(events.parent), size_guidance={"images": 0})
        acc.Reload()
        grids += [e.step for e in acc.Images("eval/grid")] if "eval/grid" in acc.Tags()["images"] else []
    assert sorted(grids) == [0, 2, 3]  # before step 1, step 2, the end


def test_validation_images_are_never_trained_on_and_their_loss_is_logged(tmp_path, tiny_sd, numbered, monkeypatch):
    trained: set[str] = set()
    real = loop.batch_loss

    def recording(t, batch):
        trained.update(batch["caption"])
        return real(t, batch)

    monkeypatch.setattr(loop, "batch_loss", recording)
    code, out = train(tmp_path, tiny_sd, numbered, validation_split=0.25, num_train_epochs=2, eval_steps=1)
    assert code == 0
    captions = load_records(str(numbered), "image", "text")["text"]
    _, held = split_rows(len(captions), 0.25)
    assert len(held) == 2
    assert trained == {c for row, c in enumerate(captions) if row not in held}  # all the others, none held out
    metrics = json.loads((out / "logs" / "test_lora" / "metrics.json").read_text())
    # 6 images, batch 2: 3 steps an epoch; before step 1, after epoch 1, at the end
    assert [entry["step"] for entry in metrics["validation"]] == [0, 3, 6]
    assert metrics["val/loss"] == metrics["validation"][-1]["val/loss"] > 0 and metrics["steps"] == 6
    assert set(metrics) >= {"val/loss_t0-250", "val/loss_t250-500", "val/loss_t500-750", "val/loss_t750-1000"}
    logged = tensorboard_scalars(out / "logs" / "test_lora", "val/loss")
    assert [s for s, _ in logged] == [0, 3, 6]
    assert logged[-1][1] == pytest.approx(metrics["val/loss"], rel=1e-6)
    assert not list((out / "eval_images").rglob("*.png"))  # no eval prompt: the loss alone


def test_validation_loss_is_the_same_number_for_the_same_model_and_draws_no_training_rng(tiny_sd, numbered):
    params, _ = parse_params({"adaptor_name": "v", "model_name": str(tiny_sd), "dataset_name": str(numbered),
                              "resolution": 64, "aspect_ratio_bucketing": True})
    family = family_for(str(tiny_sd)).load(str(tiny_sd), torch.float32)
    family.configure_objective(params, "epsilon")
    records = load_records(str(numbered), "image", "text").select([5])
    held = setup.validation_samples(records, params)
    accelerator = type("Acc", (), {"device": torch.device("cpu"),
                                   "autocast": lambda self: torch.autocast("cpu", enabled=False)})()
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    first = Validation(family, held, accelerator, "l2", 0.1).losses()
    again = Validation(family, held, accelerator, "l2", 0.1)
    assert again.losses() == first and again.losses() == first
    assert torch.equal(torch.random.get_rng_state(), state)  # training's noise stream is untouched
    with torch.no_grad():
        next(family.denoiser.parameters()).mul_(1.5)
    assert again.losses()["val/loss"] != first["val/loss"]  # it measures the model


def test_a_validation_split_that_leaves_nothing_to_train_on_is_refused(tmp_path, tiny_sd, star_folder, capsys):
    code, out = train(tmp_path, tiny_sd, star_folder, validation_split=0.95)
    assert code == 2
    assert "validation_split: 0.95 of 8 image(s) holds out 8" in capsys.readouterr().err
    assert not (out / "test_lora").exists()


def test_eval_steps_keeps_its_name_and_says_it_counts_epochs():
    from diffusion_trainer.params import FIELDS

    assert FIELDS["eval_steps"].default == 1 and "epochs" in FIELDS["eval_steps"].description
    assert "Epochs" in FIELDS["eval_steps"].title


def test_validation_loss_sees_a_trained_text_encoder(tiny_sd, numbered):
    """With train_text_encoder, the held-out caption is encoded again by the encoder being trained."""
    params, _ = parse_params({"adaptor_name": "v", "model_name": str(tiny_sd), "dataset_name": str(numbered),
                              "resolution": 64})
    family = family_for(str(tiny_sd)).load(str(tiny_sd), torch.float32)
    family.configure_objective(params, "epsilon")
    held = setup.validation_samples(load_records(str(numbered), "image", "text").select([2]), params)
    accelerator = type("Acc", (), {"device": torch.device("cpu"),
                                   "autocast": lambda self: torch.autocast("cpu", enabled=False)})()
    validation = Validation(family, held, accelerator, "l2", 0.1)
    first = validation.losses()["val/loss"]
    family.trained_text = ("text_encoder",)  # as attach_adapters marks it
    with torch.no_grad():
        family.pipeline.text_encoder.get_input_embeddings().weight.mul_(3.0)
    assert validation.losses()["val/loss"] != first
