"""SDXL, SD3 (with and without T5) and Flux: each trains with its own objective, saves an adapter
its pipeline class reloads, and draws eval images."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import train
from diffusers import DiffusionPipeline, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from safetensors import safe_open
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffusion_trainer.caching import CachedSamples
from diffusion_trainer.data import TrainingSamples
from diffusion_trainer.families.flux import Flux
from diffusion_trainer.families.sd3 import StableDiffusion3
from diffusion_trainer.families.sdxl import StableDiffusionXL

PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
             "sd3_without_t5": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
PROMPT = "a sks star"


def reload(path, name):
    extra = {"text_encoder_3": None, "tokenizer_3": None} if name == "sd3_without_t5" else {}
    pipe = DiffusionPipeline.from_pretrained(str(path), **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw(pipe):
    return pipe(PROMPT, num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def losses(out):
    values = []
    for events in (out / "logs" / "test_lora").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        if "loss" in acc.Tags()["scalars"]:
            values += [e.value for e in sorted(acc.Scalars("loss"), key=lambda e: e.step)]
    return values


NOT_APPLICABLE = {  # a parameter each family cannot use, set in its shared run
    "sdxl": ({"weighting_scheme": "mode"}, "weighting_scheme=mode does not apply to Stable Diffusion XL"),
    "sd3": ({"snr_gamma": 5}, "snr_gamma=5.0 does not apply to Stable Diffusion 3"),
    "sd3_without_t5": ({}, None),
    "flux": ({"prediction_type": "v_prediction"}, "prediction_type=v_prediction does not apply to Flux"),
}


@pytest.fixture(scope="module")
def trained(tiny_family, star_folder, tmp_path_factory):
    """One short run per family (2 epochs, eval images on), shared by the tests below."""
    import contextlib
    import io

    runs = {}
    for name in PIPELINES:
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            code, out = train(tmp_path_factory.mktemp(name), tiny_family(name), star_folder, num_train_epochs=2,
                              eval_prompt=PROMPT, eval_steps=1, **NOT_APPLICABLE[name][0])
        runs[name] = (code, out, stderr.getvalue())
    return runs


@pytest.mark.parametrize("name", list(PIPELINES))
def test_family_trains_saves_reloads_and_draws_eval_images(trained, tiny_family, name):
    code, out, _ = trained[name]
    assert code == 0
    adapter = out / "test_lora"
    info = json.loads((adapter / "tlab_adaptor_info.json").read_text())
    assert info["model_architecture"] == PIPELINES[name]
    # eval images for every family, Flux included (the predecessor switched Flux's off)
    assert sorted(p.name for p in (out / "eval_images" / "test_lora").glob("*.png")) == ["epoch_0001.png", "final.png"]

    pipe = reload(tiny_family(name), name)
    assert type(pipe).__name__ == PIPELINES[name]
    before = draw(pipe)
    pipe.load_lora_weights(str(adapter))
    assert abs(draw(pipe) - before).mean() > 1e-5
    denoiser = pipe.unet if name == "sdxl" else pipe.transformer
    assert {s for m in denoiser.modules() if isinstance(getattr(m, "scaling", None), dict) for s in m.scaling.values()} == {2.0}


@pytest.mark.parametrize("name", list(PIPELINES))
def test_adapter_keys_use_the_denoiser_of_the_family(trained, name):
    """Predecessor fault: SD3 adapters were saved under the UNet keyword."""
    prefix = "unet." if name == "sdxl" else "transformer."
    _, out, _ = trained[name]
    with safe_open(str(out / "test_lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert keys and all(k.startswith(prefix) for k in keys)
    assert metadata[f"{prefix}lora_alpha"] == 8 and metadata[f"{prefix}r"] == 4


@pytest.mark.parametrize("name", [n for n, (_, note) in NOT_APPLICABLE.items() if note])
def test_parameters_a_family_cannot_use_are_named_once(trained, name):
    assert trained[name][2].count(NOT_APPLICABLE[name][1]) == 1


def test_guidance_is_named_when_a_flux_model_has_no_guidance_input(tmp_path, tiny_family, star_folder, capsys):
    code, _ = train(tmp_path, tiny_family("flux_schnell_like"), star_folder, num_train_epochs=1, guidance_scale=3.5)
    assert code == 0
    note = "guidance_scale=3.5 does not apply: this Flux model has no guidance input"
    assert capsys.readouterr().err.count(note) == 1


def fixed_noise_loss(name, model, images, adapter=None, repeats=6):
    """The training loss of a pipeline (with the adapter, if given) on the same noise, noise levels
    and VAE samples every time: a paired, noise-free before/after measurement."""
    from torch.utils.data import default_collate

    from diffusion_trainer.data import build_samples, load_records
    from diffusion_trainer.families import FAMILIES
    from diffusion_trainer.objectives import weighted_loss
    from diffusion_trainer.params import parse_params

    pipe = reload(model, name)
    if adapter is not None:
        pipe.load_lora_weights(str(adapter))
    family = FAMILIES[type(pipe).__name__](pipe, str(model))
    params = parse_params({"adaptor_name": "a", "model_name": str(model), "dataset_name": str(images),
                           "resolution": 64, "center_crop": True})[0]
    family.configure_objective(params, family.model_prediction_type())
    batch = default_collate([build_samples(load_records(str(images), "image", "text"), params)[0]] * 8)
    with torch.no_grad():
        conditioning = family.encode_prompts(batch["caption"])
        total = 0.0
        for repeat in range(repeats):
            torch.manual_seed(repeat)
            noisy = family.noisy_input_and_target(family.encode_images(batch["pixel_values"]))
            prediction = family.predict(family.denoiser, noisy, conditioning, batch)
            total += weighted_loss(prediction, noisy.target, noisy.loss_weights).item()
    return total / repeats


@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux"])
def test_overfitting_one_image_lowers_the_loss(tmp_path, tiny_family, one_star, name):
    model = tiny_family(name)
    code, out = train(tmp_path, model, one_star, train_batch_size=8, num_train_epochs=200,
                      max_train_steps=80, learning_rate=1e-2, lora_r=8, lora_alpha=8)
    assert code == 0
    values = losses(out)  # the logged loss falls too, but its readings are noisy: the paired measure decides
    assert len(values) >= 8 and min(values[-3:]) < values[0]
    before = fixed_noise_loss(name, model, one_star)
    after = fixed_noise_loss(name, model, one_star, adapter=out / "test_lora")
    assert after < 0.95 * before, (before, after)


@pytest.mark.parametrize("cached", [True, False], ids=["latent-cache", "encode-per-step"])
def test_sdxl_time_ids_are_the_size_and_crop_the_loader_made(tmp_path, tiny_family, monkeypatch, cached):
    """Predecessor fault: SDXL time ids in the wrong order, crops recorded as (0, 0)."""
    from PIL import Image

    for i, size in enumerate([(96, 64), (64, 112), (80, 80), (128, 64)]):  # (width, height)
        Image.new("RGB", size, (200, 40 * i, 90)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text("a picture")
    made, seen = {}, []
    samples_class = CachedSamples if cached else TrainingSamples
    getitem = samples_class.__getitem__

    def recording_getitem(self, index):
        item = getitem(self, index)
        made[index] = item["original_size"].tolist() + item["crop_top_left"].tolist()
        return item

    forward = UNet2DConditionModel.forward

    def recording_forward(self, *args, added_cond_kwargs=None, **kwargs):
        seen.append(added_cond_kwargs["time_ids"].tolist())
        return forward(self, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    predict = StableDiffusionXL.predict
    batches = []

    def recording_predict(self, denoiser, noisy, conditioning, batch):
        batches.append([made[i] for i in batch["index"].tolist()])
        return predict(self, denoiser, noisy, conditioning, batch)

    monkeypatch.setattr(samples_class, "__getitem__", recording_getitem)
    monkeypatch.setattr(UNet2DConditionModel, "forward", recording_forward)
    monkeypatch.setattr(StableDiffusionXL, "predict", recording_predict)
    code, _ = train(tmp_path / "run", tiny_family("sdxl"), tmp_path, center_crop=False, num_train_epochs=3,
                    cache_latents=cached)
    assert code == 0 and len(seen) == len(batches) == 6
    for time_ids, loader in zip(seen, batches):
        assert time_ids == [row + [64, 64] for row in loader]
    flat = [row for rows in seen for row in rows]
    assert {tuple(r[:2]) for r in flat} == {(64, 96), (112, 64), (80, 80), (64, 128)}  # (height, width)
    assert any(r[2] or r[3] for r in flat)  # real crops, not (0, 0)


@pytest.mark.parametrize("name, transformer, scale", [("sd3", SD3Transformer2DModel, 1000.0),
                                                      ("flux", FluxTransformer2DModel, 1.0)])
def test_flow_models_get_flow_noise_levels_not_ddpm_timesteps(tmp_path, tiny_family, star_folder, monkeypatch,
                                                               name, transformer, scale):
    """Predecessor fault: SD3 and Flux were trained with DDPM noise."""
    seen = []
    forward = transformer.forward

    def recording_forward(self, *args, **kwargs):
        seen.append((kwargs["timestep"].detach().clone(), kwargs.get("guidance")))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(transformer, "forward", recording_forward)
    code, _ = train(tmp_path, tiny_family(name), star_folder, num_train_epochs=1)
    assert code == 0
    timesteps = torch.cat([t for t, _ in seen[:4]])
    assert ((timesteps > 0) & (timesteps <= scale)).all()
    assert not torch.equal(timesteps, timesteps.round())  # continuous noise levels, not DDPM's integers
    if name == "flux":
        assert all(torch.equal(g, torch.ones_like(g)) for _, g in seen[:4])  # training guidance 1.0


@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux"])
def test_gradient_checkpointing_works_for_every_family(tmp_path, tiny_family, star_folder, name):
    from safetensors.torch import load_file

    weights = []
    for sub, checkpointing in (("plain", False), ("checkpointed", True)):
        code, out = train(tmp_path / sub, tiny_family(name), star_folder, num_train_epochs=1,
                          gradient_checkpointing=checkpointing)
        assert code == 0
        weights.append(load_file(out / "test_lora" / "pytorch_lora_weights.safetensors"))
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-5) for k in weights[0])


def test_bf16_loads_the_base_in_bf16_and_trains_lora_in_fp32(tmp_path, tiny_family, star_folder, monkeypatch):
    dtypes = {}
    predict = StableDiffusion3.predict

    def recording_predict(self, denoiser, noisy, conditioning, batch):
        for module in [self.denoiser, self.vae, *self.text_encoders]:  # all loaded: the caches are off
            for pname, p in module.named_parameters():
                dtypes.setdefault("lora" if "lora" in pname else "base", set()).add(p.dtype)
        return predict(self, denoiser, noisy, conditioning, batch)

    monkeypatch.setattr(StableDiffusion3, "predict", recording_predict)
    code, _ = train(tmp_path, tiny_family("sd3"), star_folder, num_train_epochs=1, mixed_precision="bf16",
                    cache_latents=False, cache_text_embeddings=False)
    assert code == 0
    assert dtypes == {"base": {torch.bfloat16}, "lora": {torch.float32}}


def test_flux_family_is_registered_for_the_lab_architecture():
    from diffusion_trainer.families import FAMILIES

    assert FAMILIES["FluxPipeline"] is Flux and FAMILIES["StableDiffusion3Pipeline"] is StableDiffusion3
