"""Encode once: the latent and text caches, aspect-ratio buckets, and what leaves the accelerator."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import train
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file

from diffusion_trainer.data.batch import ModelInputs
from diffusion_trainer.data.buckets import bucket_ladder, bucket_targets
from diffusion_trainer.data.sources import load_records
from diffusion_trainer.demo import shapes
from diffusion_trainer.families.sd import StableDiffusion
from diffusion_trainer.params import parse_params
from diffusion_trainer.reporting import Reporter
from diffusion_trainer.run.setup import training_samples


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """Eight different pictures, each caption naming its own picture."""
    folder = tmp_path_factory.mktemp("numbered")
    rng = random.Random(5)
    for i in range(8):
        image, _, colour, shape = shapes.world_sample(rng)
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"picture {i} {colour} {shape}")
    return folder


def adapter(out):
    return load_file(out / "test_lora" / "pytorch_lora_weights.safetensors")


def test_cached_and_uncached_training_are_the_same_training(tmp_path, tiny_sd, numbered):
    """Same seed, deterministic augmentation: identical noise, timesteps, VAE samples and captions,
    so identical gradients: the adapters agree to float rounding."""
    runs = {}
    for name, cached in (("cached", True), ("uncached", False)):
        code, out = train(tmp_path / name, tiny_sd, numbered, cache_latents=cached, cache_text_embeddings=cached,
                          num_train_epochs=3, caption_dropout_rate=0.3)
        assert code == 0
        runs[name] = adapter(out)
    cached, uncached = runs["cached"], runs["uncached"]
    # The VAE encodes 8 images at a time for the cache and 2 per step without it: float rounding,
    # which Adam's normalisation enlarges where gradients are near zero (2 of ~10000 weights over
    # 1e-3 relative with the (seed, epoch) data order). A latent paired with another image's caption
    # would differ by orders of magnitude more.
    assert all(torch.allclose(cached[k], uncached[k], rtol=1e-2, atol=1e-5) for k in cached)
    assert any(cached[k].abs().max() > 1e-3 for k in cached)  # and they did train


def test_every_cached_latent_meets_its_own_caption_under_shuffling(tmp_path, tiny_sd, numbered, monkeypatch):
    seen = []
    latents = ModelInputs.latents

    def recording(self, batch):
        seen.append((list(batch["caption"]), batch["latent_params"].clone()))
        return latents(self, batch)

    monkeypatch.setattr(ModelInputs, "latents", recording)
    code, _ = train(tmp_path, tiny_sd, numbered, num_train_epochs=3, random_flip=True)
    assert code == 0
    # an independent encoding of each picture, found by the number in its caption
    vae = AutoencoderKL.from_pretrained(str(tiny_sd / "vae"))
    params = parse_params({"adaptor_name": "a", "model_name": "m/m", "dataset_name": "d", "resolution": 64,
                           "center_crop": True})[0]
    samples = training_samples(load_records(str(numbered), "image", "text"), params)
    with torch.no_grad():
        means = {}  # picture number -> posterior means of the picture and of its mirror image
        for i in range(len(samples)):
            pixels = samples[i]["pixel_values"][None]
            means[samples.captions[i].split()[1]] = [vae.encode(p).latent_dist.mean[0] for p in (pixels, pixels.flip(-1))]
    orders, flips = set(), 0
    for captions, latent_params in seen:
        orders.add(tuple(captions))
        for caption, p in zip(captions, latent_params):
            mean = p[: p.shape[0] // 2]
            own = means[caption.split()[1]]
            matches = [torch.allclose(mean, m, atol=1e-4) for m in own]
            assert any(matches), caption
            flips += matches[1]
            assert all(not torch.allclose(mean, m, atol=1e-2)
                       for key, ms in means.items() if key != caption.split()[1] for m in ms)
    assert len(orders) > 1 and flips > 0  # the batches really were shuffled, and mirrored ones drawn


def cache_folders(out):
    return sorted(p.name for p in (out / "cache").glob("latents-*"))


def test_the_disk_cache_is_reused_and_rebuilt_when_its_inputs_change(tmp_path, tiny_sd, tiny_sd_v, numbered, capsys):
    output = tmp_path / "shared_output"
    common = dict(output_dir=str(output), cache_memory_budget_mb=0, num_train_epochs=1)
    assert train(tmp_path / "a", tiny_sd, numbered, **common)[0] == 0
    first = cache_folders(output)
    assert len(first) == 1 and "later runs reuse it" in capsys.readouterr().err
    assert train(tmp_path / "b", tiny_sd, numbered, **common)[0] == 0
    assert cache_folders(output) == first and "Reusing the latent cache" in capsys.readouterr().err
    for change in ({"resolution": 128}, {"color_jitter": True}, {"random_flip": True}):
        assert train(tmp_path / "c", tiny_sd, numbered, **common, **change)[0] == 0
        assert "Reusing" not in capsys.readouterr().err
    assert train(tmp_path / "d", tiny_sd_v, numbered, **common)[0] == 0  # another model
    assert "Reusing" not in capsys.readouterr().err
    assert len(cache_folders(output)) == 5
    assert not [p for p in (output / "cache").iterdir() if ".partial" in p.name]


def test_the_disk_cache_is_keyed_by_the_vae_precision_and_read_in_the_runs(tmp_path, tiny_sd, numbered, monkeypatch):
    """A cache written by a bf16 run is not reused by an fp32 run, and a cache is read back in the
    precision of the run that reads it."""
    from safetensors import safe_open

    from diffusion_trainer.data.cache import DiskLatents

    read = []
    get = DiskLatents.get

    def recording_get(self, index, variant):
        cached = get(self, index, variant)
        read.append(cached.latent_params.dtype)
        return cached

    monkeypatch.setattr(DiskLatents, "get", recording_get)
    output = tmp_path / "shared_output"
    common = dict(output_dir=str(output), cache_memory_budget_mb=0, num_train_epochs=1)
    folders = {}
    for precision, dtype in (("bf16", torch.bfloat16), ("no", torch.float32)):
        read.clear()
        assert train(tmp_path / precision, tiny_sd, numbered, mixed_precision=precision, **common)[0] == 0
        assert read and set(read) == {dtype}
        (folders[precision],) = set(cache_folders(output)) - set(folders.values())
        with safe_open(str(output / "cache" / folders[precision] / "0000000.safetensors"), "pt") as f:
            assert f.get_tensor("v0").dtype == dtype
    bf16_cache = DiskLatents(output / "cache" / folders["bf16"], torch.float32)
    assert bf16_cache.get(0, 0).latent_params.dtype == torch.float32


def test_a_disk_cache_finished_first_by_another_process_is_used(tmp_path, tiny_sd, numbered, monkeypatch):
    """Two GPUs build the same cache: the second rename meets a complete folder and uses it."""
    import shutil
    from pathlib import Path

    rename = Path.rename

    def raced_rename(self, target):
        if self.name.startswith(".latents-") and not Path(target).name.startswith("."):
            shutil.copytree(self, target)  # the other process got there first
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", raced_rename)
    output = tmp_path / "out"
    code, _ = train(tmp_path / "a", tiny_sd, numbered, output_dir=str(output), cache_memory_budget_mb=0,
                    num_train_epochs=1)
    assert code == 0
    assert len(cache_folders(output)) == 1
    assert not [p for p in (output / "cache").iterdir() if ".partial" in p.name]


def test_the_run_says_how_augmentation_is_cached(tmp_path, tiny_sd, numbered, capsys):
    assert train(tmp_path / "plain", tiny_sd, numbered, num_train_epochs=1)[0] == 0
    assert "no random augmentation: caching one latent per image (8 latents" in capsys.readouterr().err
    assert train(tmp_path / "flip", tiny_sd, numbered, num_train_epochs=1, random_flip=True)[0] == 0
    assert "caching each image and its mirror image (16 latents" in capsys.readouterr().err
    assert train(tmp_path / "jitter", tiny_sd, numbered, num_train_epochs=1, color_jitter=True,
                 latent_cache_variants=3)[0] == 0
    err = capsys.readouterr().err
    assert "random augmentation (color_jitter): caching 3 augmented variants" in err and err.count("Latent cache:") == 1


@pytest.fixture(scope="module")
def mixed_shapes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixed")
    sizes = [(64, 64), (128, 64), (64, 128), (96, 64), (128, 128), (64, 128), (128, 64), (60, 90)]  # (w, h)
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (30 * i, 120, 200)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"picture {i}")
    return folder, sizes


# (height, width) buckets of the mixed_shapes images at resolution 128: the square ones square,
# 2:1 and 3:2 landscapes in 128x192 (3:2 is nearer 2:1 than 3:1 is), portraits in 192x128
MIXED_SHAPES_BUCKETS = [(128, 128), (128, 192), (192, 128), (128, 192), (128, 128), (192, 128), (128, 192), (192, 128)]


def test_the_bucket_ladder_is_diffusers_ladder_in_multiples_of_64():
    assert bucket_ladder(128) == [(128, 128), (192, 128), (128, 192), (192, 64), (64, 192)]
    assert bucket_ladder(512) == [(512, 512), (576, 448), (448, 576), (640, 448), (448, 640), (704, 384), (384, 704)]


def test_each_image_goes_to_the_bucket_of_its_aspect_ratio(mixed_shapes):
    _, sizes = mixed_shapes
    assert bucket_targets([(h, w) for w, h in sizes], 128) == MIXED_SHAPES_BUCKETS


def test_bucketed_batches_never_mix_shapes(tmp_path, tiny_family, mixed_shapes, monkeypatch):
    from diffusion_trainer.families.sdxl import StableDiffusionXL

    folder, sizes = mixed_shapes
    seen = []
    predict = StableDiffusionXL.predict

    def recording(self, denoiser, noisy, conditioning, batch):
        seen.append((tuple(noisy.model_input.shape[-2:]), batch["target_size"].tolist(), batch["index"].tolist()))
        return predict(self, denoiser, noisy, conditioning, batch)

    monkeypatch.setattr(StableDiffusionXL, "predict", recording)
    code, _ = train(tmp_path, tiny_family("sdxl"), folder, resolution=128, aspect_ratio_bucketing=True,
                    train_batch_size=3, num_train_epochs=2)
    assert code == 0
    expected = dict(enumerate(MIXED_SHAPES_BUCKETS))
    for latent_shape, targets, indices in seen:
        assert len({tuple(t) for t in targets}) == 1  # one shape per batch
        for target, index in zip(targets, indices):
            assert tuple(target) == expected[index]  # SDXL's target size is the bucket
            assert latent_shape == (target[0] // 8, target[1] // 8)
    assert len({shape for shape, _, _ in seen}) == 3


@pytest.mark.parametrize("eval_prompt", ["", "a sks star"])
def test_encoders_leave_the_accelerator_after_caching(tmp_path, tiny_sd, numbered, monkeypatch, eval_prompt):
    """Staged loading: the text encoder is freed once the captions (and the eval prompt) are encoded,
    before the denoiser loads; with no eval prompt the VAE is freed too, with one it is moved to the
    CPU once its cache is built (recorded here, since on this machine the accelerator is the CPU too),
    is not moved again while training, and still draws the eval images, from the eval prompt as the
    pipeline encoded it beforehand."""
    from diffusion_trainer.run import setup as train_module

    events, modules = [], {}
    to, predict = torch.nn.Module.to, StableDiffusion.predict

    def recording_to(self, *args, **kwargs):
        events.append((self, str(args[0] if args else kwargs.get("device"))))
        return to(self, *args, **kwargs)

    class RecordingTextCache(train_module.TextCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            events.append(("text cache built", None))

    def recording_latent_cache(*args, **kwargs):
        store = build_latent_cache(*args, **kwargs)
        events.append(("latent cache built", None))
        return store

    def recording_predict(self, denoiser, noisy, conditioning, batch):
        modules.setdefault("present", [self.pipeline.vae, self.pipeline.text_encoder])
        events.append(("step", None))
        return predict(self, denoiser, noisy, conditioning, batch)

    def recording_denoiser(family, *args, **kwargs):
        events.append(("denoiser loads", family.pipeline.text_encoder))
        return load_denoiser(family, *args, **kwargs)

    build_latent_cache, load_denoiser = train_module.build_latent_cache, train_module.load_denoiser
    monkeypatch.setattr(torch.nn.Module, "to", recording_to)
    monkeypatch.setattr(train_module, "TextCache", RecordingTextCache)
    monkeypatch.setattr(train_module, "build_latent_cache", recording_latent_cache)
    monkeypatch.setattr(train_module, "load_denoiser", recording_denoiser)
    monkeypatch.setattr(StableDiffusion, "predict", recording_predict)
    code, out = train(tmp_path, tiny_sd, numbered, num_train_epochs=2, eval_prompt=eval_prompt, eval_steps=1)
    assert code == 0 and ("step", None) in events
    assert ("denoiser loads", None) in events  # the text encoder was freed before
    vae, text_encoder = modules["present"]
    assert text_encoder is None
    if not eval_prompt:
        assert vae is None  # freed: no longer in the pipeline
    else:
        first_step = events.index(("step", None))
        after_cache = events[events.index(("latent cache built", None)):first_step]
        assert [device for m, device in after_cache if m is vae] == ["cpu"]
        first_eval = next((i for i, (m, _) in enumerate(events) if m is vae and i > first_step), len(events))
        assert ("step", None) in events[first_step:first_eval]  # trained before anything moved them back
    assert len(list((out / "eval_images" / "test_lora").glob("*.png"))) == (3 if eval_prompt else 0)  # before, epoch 1, epoch 2


def test_the_progress_bar_counts_optimizer_steps(tmp_path, tiny_sd, numbered, monkeypatch):
    calls = {}
    begin, advance = Reporter.begin, Reporter.advance

    def recording_begin(self, total):
        calls["total"] = total
        return begin(self, total)

    def recording_advance(self, step):
        calls.setdefault("steps", []).append(step)
        return advance(self, step)

    monkeypatch.setattr(Reporter, "begin", recording_begin)
    monkeypatch.setattr(Reporter, "advance", recording_advance)
    code, _ = train(tmp_path, tiny_sd, numbered, train_batch_size=1, gradient_accumulation_steps=3, num_train_epochs=2)
    assert code == 0
    assert calls["total"] == 6 and calls["steps"] == [1, 2, 3, 4, 5, 6]  # ceil(8 / 3) per epoch


def test_a_lab_dataset_whose_pixels_change_under_the_same_file_name_gets_a_new_cache(tmp_path, tiny_sd, numbered,
                                                                                       capsys):
    """A Lab dataset is given by name, not by a folder path: the cache key is the images' bytes."""
    import shutil

    from conftest import quick_params

    from diffusion_trainer.lab.datasets import resolve_dataset_name
    from diffusion_trainer.outputs.layout import RunPaths
    from diffusion_trainer.run.train import run_training

    datasets_dir = tmp_path / "workspace" / "datasets"
    shutil.copytree(numbered, datasets_dir / "my_pictures")
    params = parse_params(quick_params(tiny_sd, resolve_dataset_name("my_pictures", datasets_dir), tmp_path / "output",
                                       cache_memory_budget_mb=0, num_train_epochs=1))[0]

    def run():
        run_training(params, RunPaths.under(params.output_dir, params.adaptor_name), Reporter())
        return capsys.readouterr().err

    assert "later runs reuse it" in run()
    assert "Reusing the latent cache" in run()
    picture = datasets_dir / "my_pictures" / "3.png"
    Image.open(picture).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(picture)
    assert "Reusing" not in run()
    assert len(cache_folders(tmp_path / "output")) == 2
