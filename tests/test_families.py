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

from diffusion_trainer.data.cache import CachedSamples
from diffusion_trainer.data.samples import TrainingSamples
from diffusion_trainer.families.flux import Flux
from diffusion_trainer.families.sd3 import StableDiffusion3
from diffusion_trainer.families.sdxl import StableDiffusionXL
from diffusion_trainer.params import parse_params

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


OTHER_SETTINGS = {"sd3_without_t5": {"max_sequence_length": 24}}


@pytest.fixture(scope="module")
def trained(tiny_family, star_folder, tmp_path_factory):
    """One short run per family (2 epochs, eval images on), shared by the tests below, with what
    the denoiser was given in training steps and in eval images: runs[name] = (exit status,
    output folder, stderr, {"train": [forward keywords], "eval": [...]})."""
    import contextlib
    import io

    def recording(forward, calls):
        def record(self, *args, **kwargs):
            calls["train" if torch.is_grad_enabled() else "eval"].append(
                {k: v.detach().clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
            return forward(self, *args, **kwargs)
        return record

    runs = {}
    for name in PIPELINES:
        stderr, calls = io.StringIO(), {"train": [], "eval": []}
        with contextlib.redirect_stderr(stderr), pytest.MonkeyPatch.context() as patch:
            for model in (SD3Transformer2DModel, FluxTransformer2DModel):
                patch.setattr(model, "forward", recording(model.forward, calls))
            code, out = train(tmp_path_factory.mktemp(name), tiny_family(name), star_folder, num_train_epochs=2,
                              eval_prompt=PROMPT, eval_steps=1, eval_num_inference_steps=2,
                              **NOT_APPLICABLE[name][0], **OTHER_SETTINGS.get(name, {}))
        runs[name] = (code, out, stderr.getvalue(), calls)
    return runs


@pytest.mark.parametrize("name", list(PIPELINES))
def test_family_trains_saves_reloads_and_draws_eval_images(trained, tiny_family, name):
    code, out, *_ = trained[name]
    assert code == 0
    adapter = out / "test_lora"
    info = json.loads((adapter / "tlab_adaptor_info.json").read_text())
    assert info["model_architecture"] == PIPELINES[name]
    # eval images for every family, Flux included (the predecessor switched Flux's off)
    assert sorted(p.name for p in (out / "eval_images" / "test_lora").glob("*.png")) == ["before.png", "epoch_0001.png", "final.png"]

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
    _, out, *_ = trained[name]
    with safe_open(str(out / "test_lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert keys and all(k.startswith(prefix) for k in keys)
    assert metadata[f"{prefix}lora_alpha"] == 8 and metadata[f"{prefix}r"] == 4


@pytest.mark.parametrize("name", [n for n, (_, note) in NOT_APPLICABLE.items() if note])
def test_parameters_a_family_cannot_use_are_named_once(trained, name):
    assert trained[name][2].count(NOT_APPLICABLE[name][1]) == 1


def test_flux_lora_covers_attention_and_feed_forward_layers_by_default(trained):
    """The reference Flux recipe's layers, in the file and in the adaptor info."""
    _, out, *_ = trained["flux"]
    info = json.loads((out / "test_lora" / "tlab_adaptor_info.json").read_text())
    expected = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                "attn.to_out.0", "attn.to_q", "attn.to_v", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2"]
    assert info["lora_config"]["target_modules"] == expected
    with safe_open(str(out / "test_lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    for layer in ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"):
        assert any(f"transformer_blocks.0.{layer}.lora_A" in k for k in keys), layer


def test_flux_eval_images_use_the_pipelines_guidance_unless_one_is_set(trained, tiny_family, star_folder, tmp_path,
                                                                       monkeypatch):
    """FLUX.1-dev samples at 3.5; eval_guidance_scale's 7.5 was used as its distilled guidance."""
    _, _, _, calls = trained["flux"]
    assert calls["eval"] and {c["guidance"].tolist()[0] for c in calls["eval"]} == {3.5}
    assert {c["guidance"].tolist()[0] for c in calls["train"]} == {1.0}  # guidance_scale, for training

    seen = []
    forward = FluxTransformer2DModel.forward

    def recording(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            seen.append(kwargs["guidance"].tolist()[0])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(FluxTransformer2DModel, "forward", recording)
    code, _ = train(tmp_path, tiny_family("flux"), star_folder, max_train_steps=1, eval_prompt=PROMPT,
                    eval_num_inference_steps=1, eval_guidance_scale=5.0)
    assert code == 0 and set(seen) == {5.0}


def test_sd3_without_t5_trains_and_draws_on_max_sequence_length_zero_tokens(trained):
    """Training and eval images give the transformer the same text: 77 CLIP tokens, then
    max_sequence_length (24 here) zero tokens where T5 would be."""
    _, _, _, calls = trained["sd3_without_t5"]
    for phase in ("train", "eval"):
        texts = [c["encoder_hidden_states"] for c in calls[phase]]
        assert texts and {t.shape[1] for t in texts} == {77 + 24}, phase
        assert all(not t[:, 77:].any() for t in texts)


@pytest.mark.parametrize("name", ["sd3", "sd3_without_t5"])
def test_sd3_training_text_is_what_the_pipeline_samples_with(tiny_family, name):
    model = tiny_family(name)
    pipe = reload(model, name)
    family = StableDiffusion3(pipe, str(model))
    params = parse_params({"adaptor_name": "a", "model_name": str(model), "dataset_name": "d",
                           "max_sequence_length": 40})[0]
    family.configure_objective(params, None)
    ours = family.encode_prompts([PROMPT, "a red circle"])
    with torch.no_grad():
        text, _, pooled, _ = pipe.encode_prompt([PROMPT, "a red circle"], None, None, do_classifier_free_guidance=False,
                                                max_sequence_length=40)
    assert ours["encoder_hidden_states"].shape == text.shape == (2, 77 + 40, 64)
    assert torch.allclose(ours["encoder_hidden_states"], text, atol=1e-6)
    assert torch.allclose(ours["pooled_projections"], pooled, atol=1e-6)


def test_lora_layers_presets_choose_the_layers_and_all_linear_reloads(tmp_path, tiny_sd, star_folder):
    from diffusers import StableDiffusionPipeline

    from diffusion_trainer.families.base import linear_layer_names

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    all_linear = linear_layer_names(pipe.unet)
    assert "time_embedding.linear_1" in all_linear and not any("conv" in n for n in all_linear)
    expected = {"attention": ["to_k", "to_out.0", "to_q", "to_v"],
                "attention+mlp": ["ff.net.0.proj", "ff.net.2", "to_k", "to_out.0", "to_q", "to_v"]}
    for layers in ("attention", "attention+mlp", "all-linear"):
        code, out = train(tmp_path / layers, tiny_sd, star_folder, max_train_steps=2, lora_layers=layers)
        assert code == 0
        info = json.loads((out / "test_lora" / "tlab_adaptor_info.json").read_text())
        with safe_open(str(out / "test_lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
            saved = json.loads(f.metadata()["lora_adapter_metadata"])["unet.target_modules"]
        # the info records the targets the adapter was made with (peft shortens a long list of names)
        assert info["lora_config"]["target_modules"] == sorted(saved) == expected.get(layers, sorted(saved))
    before = draw(pipe)
    pipe.load_lora_weights(str(out / "test_lora"))  # the all-linear adapter: LoRA on every linear layer
    assert abs(draw(pipe) - before).mean() > 1e-5
    adapted = {name for name, m in pipe.unet.named_modules() if isinstance(getattr(m, "scaling", None), dict) and m.scaling}
    assert adapted == set(all_linear)


def test_guidance_is_named_when_a_flux_model_has_no_guidance_input(tmp_path, tiny_family, star_folder, capsys):
    code, _ = train(tmp_path, tiny_family("flux_schnell_like"), star_folder, num_train_epochs=1, guidance_scale=3.5)
    assert code == 0
    note = "guidance_scale=3.5 does not apply: this Flux model has no guidance input"
    assert capsys.readouterr().err.count(note) == 1


def fixed_noise_loss(name, model, images, adapter=None, repeats=6):
    """The training loss of a pipeline (with the adapter, if given) on the same noise, noise levels
    and VAE samples every time: a paired, noise-free before/after measurement."""
    from torch.utils.data import default_collate

    from diffusion_trainer.data.sources import load_records
    from diffusion_trainer.families import FAMILIES
    from diffusion_trainer.objectives import weighted_loss
    from diffusion_trainer.params import parse_params
    from diffusion_trainer.run.setup import training_samples

    pipe = reload(model, name)
    if adapter is not None:
        pipe.load_lora_weights(str(adapter))
    family = FAMILIES[type(pipe).__name__](pipe, str(model))
    params = parse_params({"adaptor_name": "a", "model_name": str(model), "dataset_name": str(images),
                           "resolution": 64, "center_crop": True})[0]
    family.configure_objective(params, family.model_prediction_type())
    batch = default_collate([training_samples(load_records(str(images), "image", "text"), params)[0]] * 8)
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

    data = tmp_path / "data"  # beside the run's output folder, not around it
    data.mkdir()
    for i, size in enumerate([(96, 64), (64, 112), (80, 80), (128, 64)]):  # (width, height)
        Image.new("RGB", size, (200, 40 * i, 90)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a picture")
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
    code, _ = train(tmp_path / "run", tiny_family("sdxl"), data, center_crop=False, num_train_epochs=3,
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


@pytest.mark.parametrize("name, family", [("sdxl", StableDiffusionXL), ("sd3", StableDiffusion3), ("flux", Flux)])
def test_gradient_checkpointing_is_on_in_every_familys_denoiser(tmp_path, tiny_family, star_folder, monkeypatch,
                                                                name, family):
    from safetensors.torch import load_file

    enabled = []
    predict = family.predict

    def recording(self, denoiser, noisy, conditioning, batch):
        enabled.append(self.denoiser.is_gradient_checkpointing)
        return predict(self, denoiser, noisy, conditioning, batch)

    monkeypatch.setattr(family, "predict", recording)
    weights = []
    for sub, checkpointing in (("plain", False), ("checkpointed", True)):
        enabled.clear()
        code, out = train(tmp_path / sub, tiny_family(name), star_folder, num_train_epochs=1,
                          gradient_checkpointing=checkpointing)
        assert code == 0 and enabled and set(enabled) == {checkpointing}
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


@pytest.mark.parametrize("name, family", [("sdxl", StableDiffusionXL), ("sd3", StableDiffusion3), ("flux", Flux)])
def test_a_saved_pipeline_finds_the_family_that_loads_it(tiny_family, name, family):
    from diffusion_trainer.families import family_for

    model = tiny_family(name)
    assert family_for(str(model)) is family
    loaded = family.load(str(model), torch.float32)
    assert type(loaded.pipeline).__name__ == json.loads((model / "model_index.json").read_text())["_class_name"]


def test_a_parameter_one_family_owns_is_named_to_the_others_runs():
    # each family declares its own parameters in its own file; the others' runs say they do not apply
    from diffusion_trainer.families.sd import StableDiffusion

    params = parse_params({"adaptor_name": "a", "model_name": "m/n", "dataset_name": "d", "guidance_scale": 2.5,
                           "max_sequence_length": 256})[0]
    notes = {cls.__name__: cls.inapplicable_notes(object.__new__(cls), params)
             for cls in (StableDiffusion, StableDiffusion3)}
    assert [n.split(" does")[0] for n in notes["StableDiffusion"]] == ["max_sequence_length=256", "guidance_scale=2.5"]
    assert [n.split(" does")[0] for n in notes["StableDiffusion3"]] == ["guidance_scale=2.5"]
    from diffusion_trainer.families.base import ModelFamily  # Flux adds a note of its own model's on top

    flux = ModelFamily.inapplicable_notes(object.__new__(Flux), params)
    assert [n.split(" does")[0] for n in flux] == ["max_sequence_length=256"]
