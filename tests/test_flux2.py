"""FLUX.2 dev and klein: each trains (buckets, EMA, checkpoints, eval images), its adapter changes the
pipeline's output and reloads, training feeds the transformer what sampling feeds it, and the
single file names the BFL modules ComfyUI patches, with the trained weight change."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil

import pytest
import torch
from comfyui_rules import flux2_lora_names, load_flux2_lora, weight_delta
from conftest import quick_params, run_folder, train
from diffusers import DiffusionPipeline, Flux2Transformer2DModel
from peft.tuners.lora import LoraLayer
from PIL import Image
from safetensors.torch import load_file

from diffusion_trainer.families import FAMILIES, family_for
from diffusion_trainer.families.base import linear_layer_names
from diffusion_trainer.families.flux2 import Flux2, Flux2Klein
from diffusion_trainer.lora import attach_lora
from diffusion_trainer.objectives import NoisyBatch
from diffusion_trainer.params import parse_params

NAMES = {"flux2": "Flux2Pipeline", "flux2_klein": "Flux2KleinPipeline"}
PROMPT = "a sks star"
RUN = dict(resolution=96, aspect_ratio_bucketing=True, use_ema=True, checkpointing_steps=2,
           checkpoints_total_limit=10, num_train_epochs=2, eval_prompt=PROMPT, eval_num_inference_steps=1)
KLEIN_GUIDANCE_NOTE = "guidance_scale=2.0 does not apply to FLUX.2 [klein]"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one thread is several times faster than two that
    wait for each other (measured: a 512-token prompt 0.35 s against 2.2 s); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mixed_shapes(tmp_path_factory):
    """Three images of three shapes (batch 2: buckets that do not divide the batch)."""
    folder = tmp_path_factory.mktemp("data") / "mixed"
    folder.mkdir()
    for i, size in enumerate([(128, 64), (64, 128), (80, 80)]):
        Image.new("RGB", size, (200, 60 * i, 90)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a sks star {'left right center'.split()[i]}")
    return folder


def recording(calls):
    forward = Flux2Transformer2DModel.forward

    def record(self, *args, **kwargs):
        calls["train" if torch.is_grad_enabled() else "eval"].append(
            {k: v.detach().clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
        return forward(self, *args, **kwargs)
    return record


@pytest.fixture(scope="module")
def runs(tiny_family, mixed_shapes, tmp_path_factory):
    """name -> (exit status, output folder, stderr, transformer inputs {"train": [...], "eval": [...]})."""
    out = {}
    for name in NAMES:
        stderr, calls = io.StringIO(), {"train": [], "eval": []}
        extra = {"guidance_scale": 2.0} if name == "flux2_klein" else {}
        with contextlib.redirect_stderr(stderr), pytest.MonkeyPatch.context() as patch:
            patch.setattr(Flux2Transformer2DModel, "forward", recording(calls))
            code, folder = train(tmp_path_factory.mktemp(name), tiny_family(name), mixed_shapes, **RUN, **extra)
        out[name] = (code, folder, stderr.getvalue(), calls)
    return out


def reload(model):
    pipe = DiffusionPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw(pipe):
    return pipe(prompt=PROMPT, num_inference_steps=1, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("name", list(NAMES))
def test_flux2_trains_and_its_adapter_changes_and_reloads_the_output(runs, tiny_family, name):
    code, out, err, calls = runs[name]
    assert code == 0, err
    adapter = out / "test_lora"
    info = json.loads((adapter / "tlab_adaptor_info.json").read_text())
    assert info["model_architecture"] == NAMES[name] and family_for(str(tiny_family(name))) is FAMILIES[NAMES[name]]
    assert sorted(p.name for p in (out / "eval_images" / "test_lora").glob("*.png")) == [
        "before.png", "epoch_0001.png", "final.png"]
    shapes = {tuple(c["hidden_states"].shape[1:]) for c in calls["train"]}
    assert len(shapes) > 1, shapes  # buckets of other shapes than the square: 2x2-patchified tokens, 16 channels
    losses = [float(line.split("loss=")[1].split()[0]) for line in err.splitlines() if "loss=" in line]
    assert losses and all(math.isfinite(v) for v in losses)
    assert "checkpoint-2" in {p.name for p in run_folder(out).iterdir()}
    if name == "flux2_klein":  # no guidance input; eval images use the pipeline's CFG at 4.0: two passes a step
        assert err.count(KLEIN_GUIDANCE_NOTE) == 1
        assert not any("guidance" in c for c in calls["train"] + calls["eval"]) and len(calls["eval"]) == 2 * 3
    else:  # guidance_scale while training, the pipeline's 4.0 for eval images
        assert {c["guidance"].tolist()[0] for c in calls["train"]} == {1.0}
        assert {c["guidance"].tolist()[0] for c in calls["eval"]} == {4.0} and len(calls["eval"]) == 3

    pipe = reload(tiny_family(name))
    before = draw(pipe)
    pipe.load_lora_weights(str(adapter))
    with_folder = draw(pipe)
    assert abs(with_folder - before).mean() > 1e-4
    assert {s for m in pipe.transformer.modules() if isinstance(m, LoraLayer) for s in m.scaling.values()} == {2.0}
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(adapter), weight_name="test_lora.safetensors")  # the single file, BFL names
    assert abs(draw(pipe) - with_folder).max() < 1e-4


def test_flux2_resume_from_a_checkpoint_ends_with_the_same_adapter(runs, tiny_family, mixed_shapes, tmp_path,
                                                                   monkeypatch, capsys):
    _, out, _, calls = runs["flux2_klein"]
    shutil.copytree(out, tmp_path / "output")
    for checkpoint in run_folder(tmp_path / "output").iterdir():
        if checkpoint.name != "checkpoint-2":
            shutil.rmtree(checkpoint)
    resumed_calls = {"train": [], "eval": []}
    monkeypatch.setattr(Flux2Transformer2DModel, "forward", recording(resumed_calls))
    # resumed without the caches: the VAE and the text encoder run every step, to the same inputs
    code, resumed = train(tmp_path, tiny_family("flux2_klein"), mixed_shapes, resume_from_checkpoint="latest",
                          **{**RUN, "eval_prompt": ""}, guidance_scale=2.0, cache_latents=False,
                          cache_text_embeddings=False)
    total = len(calls["train"])  # 3 buckets of 1 image, batch 2: 3 steps an epoch
    err = capsys.readouterr().err
    assert code == 0 and f"step 2 of {total}" in err and "Latent cache" not in err and "Text cache" not in err
    assert total == 6 and len(resumed_calls["train"]) == total - 2  # only the steps after the checkpoint
    for before, after in zip(calls["train"][2:], resumed_calls["train"]):  # the same batches, noise and levels
        assert all(torch.allclose(before[k], after[k], atol=1e-5) for k in before)
    first, second = (load_file(o / "test_lora" / "pytorch_lora_weights.safetensors") for o in (out, resumed))
    assert first.keys() == second.keys()
    assert all(torch.allclose(first[k], second[k], atol=1e-5) for k in first)


def family_and_params(tiny_family, name, **overrides):
    model = tiny_family(name)
    pipe = reload(model)
    family = FAMILIES[NAMES[name]](pipe, str(model))
    params = parse_params(quick_params(model, model, model, **overrides))[0]
    family.configure_objective(params, None)
    return family, pipe


@pytest.mark.parametrize("name", list(NAMES))
def test_training_feeds_the_transformer_what_a_pipeline_denoising_step_feeds_it(tiny_family, name, monkeypatch):
    # the pipeline's default guidance (4.0) is dev's guidance input; klein uses it for real CFG
    family, pipe = family_and_params(tiny_family, name, guidance_scale=4.0)
    torch.manual_seed(0)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    latents = family.encode_images(pixels)  # mode latents, patchified, batch-norm normalised
    assert torch.allclose(latents, pipe._encode_vae_image(pixels, None), atol=1e-6)
    x_t = torch.randn_like(latents)
    calls = {"train": [], "eval": []}
    monkeypatch.setattr(Flux2Transformer2DModel, "forward", recording(calls))
    pipe(prompt=PROMPT, latents=x_t, num_inference_steps=2, height=64, width=64, output_type="latent")
    sampled = calls["eval"][0]  # the first step (klein: its conditional pass)
    calls["eval"].clear()
    sigma = sampled["timestep"]
    noisy = NoisyBatch(x_t, x_t, sigma * 1000, None, sigma)
    with torch.no_grad():
        prediction = family.predict(pipe.transformer, noisy, family.encode_prompts([PROMPT]), {})
    trained = calls["eval"][0]
    assert sampled.keys() == trained.keys()
    for key in sampled:
        assert sampled[key].dtype == trained[key].dtype and torch.equal(sampled[key], trained[key]), key
    assert ("guidance" in trained) == (name == "flux2")
    with torch.no_grad():
        packed = pipe.transformer(**sampled, return_dict=False)[0]
    assert torch.equal(prediction, pipe._unpack_latents_with_ids(packed, sampled["img_ids"]))


def test_flux2_noise_levels_follow_the_pipelines_shift_for_the_image_size(tiny_family):
    family, _ = family_and_params(tiny_family, "flux2", weighting_scheme="logit_normal")
    latents = torch.zeros(64, 16, 4, 6)  # 24 tokens
    torch.manual_seed(0)
    noisy = family.noisy_input_and_target(latents)
    torch.manual_seed(0)
    u = torch.sigmoid(torch.randn(64))
    a1, b1, a2, b2 = 8.73809524e-05, 1.89833333, 0.00016927, 0.45666666  # BFL's empirical mu, 50 steps
    m200, m10 = a2 * 24 + b2, a1 * 24 + b1
    mu = (m200 - m10) / 190 * 50 + m200 - 200 * (m200 - m10) / 190
    assert torch.allclose(noisy.sigmas, math.exp(mu) / (math.exp(mu) + 1 / u - 1), atol=1e-6)


@pytest.mark.parametrize("layers", ["attention", "attention+mlp", "all-linear"])
def test_flux2_lora_layers_and_the_single_file_comfyui_patches(tiny_family, tmp_path, layers):
    from diffusion_trainer.outputs.adapter import save_adapter
    from diffusion_trainer.run import loop
    from diffusion_trainer.run.train import adapter_info

    model = tiny_family("flux2")
    family = Flux2.load(str(model), torch.float32)
    targets, every_linear = family.lora_targets(layers), set(linear_layer_names(family.denoiser))
    single = {"single_transformer_blocks.0.attn.to_out", "single_transformer_blocks.0.attn.to_qkv_mlp_proj"}
    assert single <= set(targets) and "transformer_blocks.0.attn.add_k_proj" in targets
    assert ("transformer_blocks.0.ff.linear_in" in targets) == (layers != "attention")
    if layers == "all-linear":
        assert set(targets) == every_linear and "norm_out.linear" in targets
    attach_lora(family.denoiser, 4, 8, targets)
    generator = torch.Generator().manual_seed(0)
    for pname, weight in family.denoiser.named_parameters():
        if "lora_" in pname:
            weight.data = torch.randn(weight.shape, generator=generator) * 0.1
    params = parse_params(quick_params(model, model, tmp_path, adaptor_name="f2"))[0]
    info = adapter_info(family, params, loop.Outcome(steps=1, epochs=1), None)
    adapter = save_adapter(tmp_path / "f2", family, "f2", info, None, ["a sks star"])
    lora = load_file(str(adapter / "f2.safetensors"))
    assert all(k.startswith("diffusion_model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in lora)
    accepted = flux2_lora_names(dict(family.denoiser.config))
    # ComfyUI's map names every linear layer of the model, so only our keys can fail below
    assert {m for layers_ in accepted.values() for m, *_ in layers_} == every_linear
    patches, not_loaded = load_flux2_lora(lora, accepted)
    assert not_loaded == []  # ComfyUI would warn "lora key not loaded" for each
    peft_layers = {n: m for n, m in family.denoiser.named_modules() if isinstance(m, LoraLayer)}
    assert set(patches) == set(peft_layers)
    for module, layer in peft_layers.items():
        up, down, alpha = patches[module]
        delta = weight_delta(up, down, alpha, layer.get_base_layer().weight.shape)
        torch.testing.assert_close(delta.float(), layer.get_delta_weight("default"), rtol=1e-5, atol=1e-6)


def test_klein_is_its_own_family_without_a_guidance_input(tiny_family):
    assert family_for(str(tiny_family("flux2_klein"))) is Flux2Klein
    meta = Flux2Klein.base_model_metadata({"guidance_embeds": False}, None)
    assert meta["modelspec.architecture"] == "flux-2-klein/lora"


def paired_loss(name, model, latents, text, adapter=None):
    """The loss on fixed noise and noise levels, with the adapter if given: a noise-free before/after."""
    from diffusion_trainer.objectives import weighted_loss

    pipe = reload(model)
    if adapter is not None:
        pipe.load_lora_weights(str(adapter))
    family = FAMILIES[NAMES[name]](pipe, str(model))
    family.configure_objective(parse_params(quick_params(model, model, model))[0], None)
    total = 0.0
    with torch.no_grad():
        for repeat in range(3):
            torch.manual_seed(repeat)
            noisy = family.noisy_input_and_target(latents)
            total += weighted_loss(family.predict(family.denoiser, noisy, text, {}), noisy.target, None).item()
    return total / 3


@pytest.mark.parametrize("name", list(NAMES))
def test_overfitting_one_image_lowers_the_flux2_loss(tiny_family, one_star, tmp_path, name):
    model = tiny_family(name)
    code, out = train(tmp_path, model, one_star, train_batch_size=4, max_train_steps=8, learning_rate=3e-2,
                      lora_r=8, lora_alpha=8)
    assert code == 0
    family = FAMILIES[NAMES[name]](reload(model), str(model))
    image = Image.open(next(one_star.glob("*.png"))).convert("RGB").resize((64, 64))
    pixels = torch.tensor(list(image.getdata()), dtype=torch.float32).view(1, 64, 64, 3).permute(0, 3, 1, 2)
    latents = family.encode_images(pixels / 127.5 - 1).repeat(4, 1, 1, 1)
    text = {k: v.repeat(4, 1, 1) for k, v in family.encode_prompts([(one_star / "0000.txt").read_text().strip()]).items()}
    before = paired_loss(name, model, latents, text)
    after = paired_loss(name, model, latents, text, out / "test_lora")
    assert after < 0.95 * before, (before, after)
