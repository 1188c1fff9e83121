"""Chroma, Z-Image and Qwen-Image (issue 22): each trains through main.py and its adapter, loaded
into the pipeline by diffusers (the folder's file and the single file alike), draws the run's
final eval image again; the denoiser is fed in training exactly what its pipeline feeds it when
sampling; and the latents trained on are the ones the pipeline decodes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import train
from diffusers import DiffusionPipeline, FluxPipeline, QwenImagePipeline
from PIL import Image

from diffusion_trainer.families import FAMILIES, family_for
from diffusion_trainer.objectives import NoisyBatch
from diffusion_trainer.outputs.layout import single_file_name
from diffusion_trainer.params import parse_params

PIPELINES = {"chroma": "ChromaPipeline", "z_image": "ZImagePipeline", "qwen_image": "QwenImagePipeline"}
PROMPTS = ["a sks star", "a big red circle on the left of a small blue square"]  # two text lengths
# the tiny Qwen-Image's picture moves little with its image-stream attention alone
RUN_SETTINGS = {"qwen_image": {"lora_layers": "attention+mlp", "learning_rate": 3e-2}}
NO_CFG = {"chroma": {"guidance_scale": 1.0}, "z_image": {"guidance_scale": 0.0}, "qwen_image": {}}


def loaded(model):
    pipe = DiffusionPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    family = FAMILIES[type(pipe).__name__](pipe, str(model))
    params = parse_params({"adaptor_name": "a", "model_name": str(model), "dataset_name": "d"})[0]
    family.configure_objective(params, None)
    return pipe, family


def eval_image(pipe, family, steps=1):
    """The eval image as the run draws it (prompt, seed 0, resolution, the family's call keywords)."""
    image = pipe(prompt=PROMPTS[0], num_inference_steps=steps, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), **family.eval_call_kwargs(0.0)).images[0]
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def trained(tiny_family, star_folder, tmp_path_factory):
    """One short run per family: 8 images in batches of 3, eval images before and after."""
    return {name: train(tmp_path_factory.mktemp(name), tiny_family(name), star_folder, num_train_epochs=1,
                        train_batch_size=3, eval_prompt=PROMPTS[0], eval_num_inference_steps=1,
                        **{"learning_rate": 1e-2, **RUN_SETTINGS.get(name, {})})
            for name in PIPELINES}


@pytest.mark.parametrize("name", list(PIPELINES))
def test_trains_and_diffusers_reloads_the_adapter_to_the_trained_eval_image(trained, tiny_family, name):
    code, out = trained[name]
    assert code == 0
    adapter = out / "test_lora"
    assert json.loads((adapter / "tlab_adaptor_info.json").read_text())["model_architecture"] == PIPELINES[name]
    assert family_for(str(tiny_family(name))) is FAMILIES[PIPELINES[name]]
    images = out / "eval_images" / "test_lora"
    final = np.asarray(Image.open(images / "final.png"), dtype=np.int16)
    assert np.abs(final - np.asarray(Image.open(images / "before.png"), dtype=np.int16)).mean() > 1  # it learned

    pipe, family = loaded(tiny_family(name))
    pipe.load_lora_weights(str(adapter))
    assert np.abs(eval_image(pipe, family) - final).max() <= 1  # the trained output, to PNG rounding
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(adapter), weight_name=single_file_name("test_lora"))  # the ComfyUI-form file
    assert np.abs(eval_image(pipe, family) - final).max() <= 1


def snapshot(value):
    """A copy of a call's inputs as they were given (Z-Image's transformer edits its input lists)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(v) for v in value)
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    return value


def recording(transformer_class, calls):
    forward = transformer_class.forward

    def record(self, *args, **kwargs):
        given = snapshot((args, kwargs))
        out = forward(self, *args, **kwargs)
        calls.append((*given, out))
        return out
    return record


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=1e-6)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def pipeline_latents(name, args, kwargs, pipe):
    """The step's latents (B, C, h, w) and noise level, from the transformer's inputs in one pipeline step."""
    if name == "z_image":
        return torch.stack(args[0]).squeeze(2), 1 - args[1]  # Z-Image's timestep is 1 - sigma
    packed = kwargs["hidden_states"]
    if name == "chroma":
        return FluxPipeline._unpack_latents(packed, 64, 64, pipe.vae_scale_factor), kwargs["timestep"]
    return QwenImagePipeline._unpack_latents(packed, 64, 64, pipe.vae_scale_factor).squeeze(2), kwargs["timestep"]


def velocity(name, out, pipe):
    """What the scheduler steps with, from the transformer's output (noise - x0)."""
    if name == "z_image":
        return -torch.stack([o.float() for o in out[0]]).squeeze(2)
    if name == "chroma":
        return FluxPipeline._unpack_latents(out[0], 64, 64, pipe.vae_scale_factor)
    return QwenImagePipeline._unpack_latents(out[0], 64, 64, pipe.vae_scale_factor).squeeze(2)


@pytest.mark.parametrize("name", list(PIPELINES))
def test_training_feeds_the_transformer_what_the_pipeline_feeds_it(tiny_family, monkeypatch, name):
    """One pipeline step on two prompts of different lengths vs the family's predict on the same
    latents and noise level, its text encoded one caption at a time as the text cache stores it."""
    pipe, family = loaded(tiny_family(name))
    calls = []
    monkeypatch.setattr(type(pipe.transformer), "forward", recording(type(pipe.transformer), calls))
    with torch.no_grad():
        pipe(list(PROMPTS), num_inference_steps=1, height=64, width=64, output_type="latent",  # Z-Image edits it
             generator=torch.Generator().manual_seed(0), **family.eval_call_kwargs(0.0), **NO_CFG[name])
        (args, kwargs, out), = calls
        latents, sigmas = pipeline_latents(name, args, kwargs, pipe)
        rows = [family.encode_prompts([prompt]) for prompt in PROMPTS]
        conditioning = {key: torch.cat([row[key] for row in rows]) for key in rows[0]}
        noisy = NoisyBatch(latents, torch.zeros_like(latents), sigmas * 1000, None, sigmas)
        prediction = family.predict(family.denoiser, noisy, conditioning, {})
    (our_args, our_kwargs, _), = calls[1:]
    assert same(our_args, args)
    given = {k: v for k, v in kwargs.items() if v is not None and k not in ("return_dict", "attention_kwargs",
                                                                           "joint_attention_kwargs")}
    assert {k: v for k, v in our_kwargs.items() if v is not None and k != "return_dict"}.keys() == given.keys()
    for key, value in given.items():
        assert same(our_kwargs[key], value), key
    assert torch.allclose(prediction.float(), velocity(name, out, pipe), atol=1e-6)


@pytest.mark.parametrize("name", list(PIPELINES))
def test_training_latents_are_what_the_pipeline_decodes(tiny_family, star_folder, monkeypatch, name):
    """The family's latents of an image, handed to the pipeline with a transformer that predicts no
    change, decode to the VAE's own reconstruction: the latent scale, shift or per-channel mean/std
    the family trains with is the one the pipeline undoes."""
    pipe, family = loaded(tiny_family(name))
    image = Image.open(sorted(star_folder.glob("*.png"))[0]).convert("RGB").resize((64, 64))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        posterior = family.posterior(pixels)
        latents = family.latents_from_distribution(type("Mode", (), {"sample": lambda self: posterior.mode()})())
        mode = posterior.mode()
        decoded = pipe.vae.decode(mode.unsqueeze(2) if name == "qwen_image" else mode).sample
        expected = (decoded.squeeze(2) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()

    def no_change(self, *args, **kwargs):
        if name == "z_image":
            return ([torch.zeros_like(x) for x in args[0]],)
        return (torch.zeros_like(kwargs["hidden_states"]),)

    monkeypatch.setattr(type(pipe.transformer), "forward", no_change)
    b, c, h, w = latents.shape
    given = {"z_image": latents, "chroma": FluxPipeline._pack_latents(latents, b, c, h, w),
             "qwen_image": QwenImagePipeline._pack_latents(latents, b, c, h, w)}[name]
    drawn = pipe(PROMPTS[0], latents=given, num_inference_steps=1, height=64, width=64, output_type="np",
                 **family.eval_call_kwargs(0.0)).images
    assert np.abs(drawn - expected).max() < 1e-4
