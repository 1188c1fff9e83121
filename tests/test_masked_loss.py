"""masked_loss: the loss averaged over the mask with no gradient outside it, the mask carried
through every flip, crop and rotation, and masks checked before loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_trainer.data.check import check_dataset
from diffusion_trainer.data.images import Augmentation, ImageTransform
from diffusion_trainer.data.sources import load_records
from diffusion_trainer.errors import InputError
from diffusion_trainer.objectives import weighted_loss
from diffusion_trainer.params import parse_params
from diffusion_trainer.reporting import Reporter


def test_the_loss_is_the_mean_over_the_mask_and_nothing_outside_it_has_a_gradient():
    prediction = torch.arange(16.0).view(2, 1, 2, 4).repeat(1, 3, 1, 1).requires_grad_()
    target = torch.zeros(2, 3, 2, 4)
    mask = torch.zeros(2, 1, 2, 4)
    mask[0, :, :, :2] = 1  # sample 0: its left half; sample 1: nothing
    loss = weighted_loss(prediction, target, None, mask=mask)
    kept = prediction[0, :, :, :2].detach()
    assert loss.item() == pytest.approx(kept.square().mean().item() / 2)  # sample 1 counts 0
    loss.backward()
    assert torch.all(prediction.grad[0, :, :, 2:] == 0) and torch.all(prediction.grad[1] == 0)
    assert torch.all(prediction.grad[0, :, :, :2][kept != 0] != 0)
    # a mask of ones is the unmasked loss: with masked_loss off nothing changes
    assert weighted_loss(prediction, target, None, "huber", 0.1, torch.ones(2, 1, 2, 4)).item() == pytest.approx(
        weighted_loss(prediction, target, None, "huber", 0.1).item())


def test_a_mask_follows_every_flip_crop_and_rotation():
    # left 60 px red and kept, right 40 px blue and masked out
    pixels = np.zeros((64, 100, 3), np.uint8)
    pixels[:, :60, 0], pixels[:, 60:, 2] = 255, 255
    mask = np.zeros((64, 100), np.uint8)
    mask[:, :60] = 255
    values = {"adaptor_name": "a", "model_name": "m/m", "dataset_name": "d", "resolution": 64, "random_flip": True,
              "center_crop": False, "random_rotation": True, "rotation_degrees": 30, "rotation_prob": 0.5,
              "image_interpolation_mode": "nearest"}
    transform = ImageTransform(Augmentation.of(parse_params(values)[0]))
    flips = set()
    for seed in range(12):
        out = transform(Image.fromarray(pixels), seed, (48, 64) if seed % 2 else None, mask=Image.fromarray(mask))
        assert out.mask.shape == (1, *out.pixels.shape[1:])
        red = (out.pixels[0] > 0.5) & (out.pixels[2] < -0.5)
        assert torch.all(red[out.mask[0] > 0.99]) and not torch.any(red[out.mask[0] < 0.01])
        flips.add(out.flipped)
    assert flips == {True, False}


def write_image(path, size=(64, 64), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, {"RGBA": (200, 10, 10, 128), "L": 255}.get(mode, (200, 10, 10))).save(path)


def checked(folder, **kwargs):
    records = load_records(str(folder), "image", "text", default_caption="a thing")
    return check_dataset(records, image_column="image", caption_column="text", dataset_name=str(folder),
                         skip_bad_images=False, resolution=64, bucketing=False, load_problems=[], reporter=Reporter(),
                         masked_loss=True, **kwargs)


def test_masks_come_from_masks_files_or_alpha_and_the_rest_are_counted(tmp_path, capsys):
    write_image(tmp_path / "a.jpg")
    write_image(tmp_path / "masks" / "a.png", mode="L")  # a mask, not a training image
    write_image(tmp_path / "b.png", mode="RGBA")
    write_image(tmp_path / "c.png")
    result = checked(tmp_path)
    assert result.masks == [str(tmp_path / "masks" / "a.png"), ":alpha:", None]
    assert ("masks for 2 of 3 images (1 from masks/ files, 1 from alpha channels); 1 have none and train on the "
            "whole image: c.png") in capsys.readouterr().err


def test_a_mask_of_another_size_and_no_mask_at_all_are_refused_by_name(tmp_path):
    write_image(tmp_path / "one" / "a.png")
    write_image(tmp_path / "one" / "masks" / "a.png", size=(32, 64), mode="L")
    with pytest.raises(InputError, match=r"a\.png: its mask .*masks/a\.png is 32x64, the image 64x64"):
        checked(tmp_path / "one")
    write_image(tmp_path / "two" / "a.png")
    with pytest.raises(InputError, match="masked_loss: none of the 1 images .* has a mask"):
        checked(tmp_path / "two")


@pytest.mark.parametrize("name, prior", [("sd", False), ("flux", False), ("sd", True)])
def test_a_training_step_gives_the_masked_out_region_no_gradient(tiny_sd, tiny_family, name, prior):
    """Through the loop's own batch_loss (Flux packs its latents 2x2 and unpacks the prediction):
    the prediction's gradient is zero where the mask is, and a target changed there changes nothing.
    With prior preservation, the class rows (no masks) train on the whole image."""
    from types import SimpleNamespace

    from diffusion_trainer.data.batch import ModelInputs
    from diffusion_trainer.families import family_for
    from diffusion_trainer.run import loop

    model = tiny_sd if name == "sd" else tiny_family("flux")
    family = family_for(str(model)).load(str(model), torch.float32)
    params = parse_params({"adaptor_name": "a", "model_name": str(model), "dataset_name": "d", "resolution": 64})[0]
    family.configure_objective(params, family.model_prediction_type())
    mask = torch.zeros(2, 1, 64, 64)
    mask[:, :, :, :32] = 1  # the left half trains
    batch = {"pixel_values": torch.rand(2, 3, 64, 64) * 2 - 1, "caption": ["a", "b"], "mask": mask,
             "original_size": torch.tensor([[64, 64]] * 2), "crop_top_left": torch.tensor([[0, 0]] * 2),
             "target_size": torch.tensor([[64, 64]] * 2)}
    if prior:
        batch["class"] = {key: value for key, value in batch.items() if key != "mask"} | {"caption": ["c", "c"]}
    seen = {}
    predict, noisy_batch = family.predict, family.noisy_input_and_target

    def keep_prediction(*args):
        seen["prediction"] = prediction = predict(*args)
        prediction.retain_grad()
        return prediction

    def shifted_target(latents):
        noisy = noisy_batch(latents)
        noisy.target[..., 4:] += seen.get("shift", 0.0)  # the right half of the 8x8 latent grid
        return noisy

    family.predict, family.noisy_input_and_target = keep_prediction, shifted_target
    t = SimpleNamespace(inputs=ModelInputs(family, 0.0, torch.device("cpu")), family=family,
                        denoiser=family.denoiser, loss_type="l2", huber_c=0.1, prior_loss_weight=1.0)
    losses = []
    for shift in (0.0, 5.0):
        seen["shift"] = shift
        torch.manual_seed(0)
        loss, _ = loop.batch_loss(t, batch)
        loss.backward()
        losses.append(loss.item())
        grad = seen["prediction"].grad
        assert torch.all(grad[:2, ..., 4:] == 0) and torch.all(grad[:2, ..., :4].abs().sum(dim=(0, 1)) > 0)
        if prior:
            assert grad.shape[0] == 4 and torch.all(grad[2:].abs().sum(dim=(0, 1)) > 0)
    if prior:
        assert losses[1] > losses[0]  # the class rows' whole-image loss sees the shifted target
    else:
        assert losses[0] == pytest.approx(losses[1])


def test_a_masked_run_trains_from_the_disk_cache_and_the_masks_change_its_key(tmp_path, tiny_sd, capsys):
    from conftest import quick_params, run_main, write_config

    from diffusion_trainer.data.cache import DiskLatents

    for n in range(3):
        write_image(tmp_path / "data" / f"{n}.png")
        (tmp_path / "data" / f"{n}.txt").write_text("a sks thing")
    write_image(tmp_path / "data" / "masks" / "0.png", mode="L")
    keys = []
    for masked in (True, False):
        config = write_config(tmp_path / "run.json", quick_params(
            tiny_sd, tmp_path / "data", tmp_path / "output", masked_loss=masked, cache_memory_budget_mb=0,
            random_flip=True, num_train_epochs=1))
        assert run_main(["--config", str(config)]) == 0
        caches = sorted((tmp_path / "output" / "cache").rglob("latents-*"))
        keys.append({c.name for c in caches})
    assert "masks for 1 of 3 images (1 from masks/ files)" in capsys.readouterr().err
    assert len(keys[0]) == 1 and len(keys[1]) == 2  # masked_loss off: another cache, without masks
    masked = next(c for c in caches if c.name in keys[0])
    store = DiskLatents(masked, torch.float32)
    variant = store.get(0, 0)
    assert variant.mask is not None and variant.mask.shape == (1, 8, 8)
    assert DiskLatents(next(c for c in caches if c.name not in keys[0]), torch.float32).get(0, 0).mask is None
