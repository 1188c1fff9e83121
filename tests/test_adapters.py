"""Text-encoder LoRA and the adapter types beyond LoRA (issue 21.1, 21.2), each trained for a few steps
on a tiny model: the text encoder's output changes and diffusers' load_lora_weights of the saved folder
draws the trained run's last eval image again; every single-file key is one ComfyUI maps, and ComfyUI's
weight change equals peft's; LoKr resumes exactly; PiSSA's adapter applies to the original base."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from comfyui_rules import accepted_clip_names, accepted_lora_names, load_lora, load_lycoris, lycoris_delta
from conftest import quick_params, run_main, train, write_config
from PIL import Image
from safetensors.torch import load_file

from diffusion_trainer.families import family_for
from diffusion_trainer.families.text import token_ids
from diffusion_trainer.outputs.layout import WEIGHTS_NAME, single_file_name

PROMPT = "a sks star"


def run(tmp_path, model, data, **overrides):
    settings = dict(num_train_epochs=1, max_train_steps=3, eval_prompt=PROMPT, eval_steps=100,
                    eval_num_inference_steps=2)
    code, out = train(tmp_path, model, data, **{**settings, **overrides})
    assert code == 0
    return out


def base_pipeline(model):
    return family_for(str(model)).load(str(model), torch.float32).pipeline


def redraw(pipe, seed=0):
    """The final eval image as the evaluator drew it (seed, steps, size, the pipeline's guidance)."""
    return np.asarray(pipe(PROMPT, num_inference_steps=2, height=64, width=64,
                           generator=torch.Generator("cpu").manual_seed(seed)).images[0])


def final_image(out):
    return np.asarray(Image.open(out / "eval_images" / "test_lora" / "final.png"))


def text_output(pipe, attr="text_encoder", tokenizer="tokenizer"):
    with torch.no_grad():
        return getattr(pipe, attr)(token_ids(getattr(pipe, tokenizer), [PROMPT]))[0]


def single_file(out):
    return load_file(str(out / "test_lora" / single_file_name("test_lora")))


@pytest.fixture(scope="module")
def te_lora(tiny_sd, star_folder, tmp_path_factory):
    return run(tmp_path_factory.mktemp("te_lora"), tiny_sd, star_folder, train_text_encoder=True,
               text_encoder_lr=2e-3, use_ema=True, ema_decay=0.5)


def test_text_encoder_lora_changes_the_text_encoder_and_reloads_in_diffusers(te_lora, tiny_sd):
    pipe = base_pipeline(tiny_sd)
    before = text_output(pipe)
    pipe.load_lora_weights(str(te_lora / "test_lora"), weight_name=WEIGHTS_NAME)
    assert (text_output(pipe) - before).abs().max() > 1e-4  # the saved text-encoder LoRA changes its output
    assert np.abs(redraw(pipe).astype(int) - final_image(te_lora).astype(int)).max() <= 1


def test_text_encoder_lora_single_file_keys_are_comfyuis(te_lora, tiny_sd):
    lora = single_file(te_lora)
    denoiser = family_for(str(tiny_sd)).load(str(tiny_sd), torch.float32).denoiser
    accepted = {**accepted_lora_names("kohya", dict(denoiser.config)), **accepted_clip_names("StableDiffusionPipeline")}
    patches, unloaded = load_lora(lora, accepted)
    assert unloaded == []
    text = [m for m in patches if m.startswith("text_encoder.")]
    assert len(text) == 4 * 2  # q, k, v, out of the tiny CLIP's 2 layers
    up, down, alpha = patches[text[0]]
    assert alpha == 8.0 and down.shape[0] == 4  # alpha at the trained strength: 8 / 4


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_lycoris_types_train_and_match_comfyuis_weights(kind, tiny_family, star_folder, tmp_path):
    model = tiny_family("sdxl")
    out = run(tmp_path, model, star_folder, lora_type=kind, train_text_encoder=True)
    lora = single_file(out)
    family = family_for(str(model)).load(str(model), torch.float32)
    accepted = {**accepted_lora_names("kohya", dict(family.denoiser.config)),
                **accepted_clip_names("StableDiffusionXLPipeline")}
    patches, unloaded = load_lycoris(lora, accepted)
    assert unloaded == [] and {kind} == {p[0] for p in patches.values()}
    assert any(m.startswith("text_encoder_2.") for m in patches)
    # peft's own weight change of each module, with the saved weights loaded back into peft's layers
    from peft.utils import set_peft_model_state_dict

    from diffusion_trainer.lora import TEXT_ENCODER_LAYERS, AdapterSpec, attach

    saved = load_file(str(out / "test_lora" / WEIGHTS_NAME))
    spec = AdapterSpec(kind, 4, 8)
    modules = {"unet": family.denoiser, "text_encoder": family.pipeline.text_encoder,
               "text_encoder_2": family.pipeline.text_encoder_2}
    for component, module in modules.items():
        attach(module, spec, family.lora_targets("default") if component == "unet" else TEXT_ENCODER_LAYERS["attention"])
        state = {k.split(".", 1)[1]: v for k, v in saved.items() if k.split(".", 1)[0] == component}
        assert not set_peft_model_state_dict(module, state).unexpected_keys
    for module, (_, parts, alpha) in patches.items():
        component, path = ("unet", module) if not module.startswith("text_encoder") else module.split(".", 1)
        expected = layer(modules[component], path).get_delta_weight("default").double()
        assert torch.allclose(lycoris_delta(kind, parts, alpha, expected.shape), expected, atol=1e-6), module


def layer(module, path):
    """A layer by the checkpoint's name; transformers 5's CLIPTextModel has no `text_model.` level."""
    try:
        return module.get_submodule(path)
    except AttributeError:
        return module.get_submodule(path.removeprefix("text_model."))


@pytest.mark.parametrize("kind, init", [("dora", "gaussian"), ("lora", "pissa")])
def test_dora_and_pissa_reload_in_diffusers_on_the_original_base(kind, init, tiny_sd, star_folder, tmp_path):
    """DoRA through diffusers' loader; PiSSA's adapter (the base changed while training) converted so
    the original base model plus the adapter draws what the trained run drew."""
    out = run(tmp_path, tiny_sd, star_folder, lora_type=kind, lora_init=init, lora_dropout=0.1)
    saved = load_file(str(out / "test_lora" / WEIGHTS_NAME))
    assert (kind == "dora") == any("lora_magnitude_vector" in k for k in saved)
    has_single_file = (out / "test_lora" / single_file_name("test_lora")).is_file()
    assert has_single_file == (kind != "dora")
    if init == "pissa":
        assert {t.shape[0] for k, t in saved.items() if "lora.down" in k or "lora_A" in k} == {8}  # rank 2 x 4
    pipe = base_pipeline(tiny_sd)
    pipe.load_lora_weights(str(out / "test_lora"), weight_name=WEIGHTS_NAME)
    assert np.abs(redraw(pipe).astype(int) - final_image(out).astype(int)).max() <= 1


def test_lokr_with_text_encoder_resumes_exactly(tiny_sd, star_folder, tmp_path, capfd):
    """A LoKr run with a text-encoder adapter, stopped by its step count at a checkpoint and resumed,
    ends with the weights of the run never stopped."""
    settings = dict(lora_type="lokr", train_text_encoder=True, lora_dropout=0.2, checkpointing_steps=2,
                    num_train_epochs=1, max_train_steps=4, eval_prompt="")
    code, straight = train(tmp_path / "straight", tiny_sd, star_folder, **settings)
    assert code == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed / "output")
    shutil.rmtree(resumed / "output" / "test_lora")
    checkpoint = next((resumed / "output" / "checkpoints" / "test_lora").glob("run-*/checkpoint-2"))
    for later in checkpoint.parent.glob("checkpoint-4"):
        shutil.rmtree(later)
    config = write_config(resumed / "run.json", quick_params(tiny_sd, star_folder, resumed / "output", **settings,
                                                             resume_from_checkpoint=str(checkpoint)))
    capfd.readouterr()
    assert run_main(["--config", str(config)]) == 0
    assert "checkpoint-2: step 2 of 4" in capfd.readouterr().err
    a = load_file(str(straight / "test_lora" / WEIGHTS_NAME))
    b = load_file(str(resumed / "output" / "test_lora" / WEIGHTS_NAME))
    assert a.keys() == b.keys() and any(k.startswith("text_encoder.") and "lokr" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sd3_text_encoder_lora_keeps_t5_cached(tiny_family, star_folder, tmp_path, capfd):
    """SD3: the CLIP encoders are trained and encoded every step, T5 stays frozen and cached; the
    single file names the CLIP adapters lora_te1_/lora_te2_ (ComfyUI's clip_l and clip_g)."""
    out = run(tmp_path, tiny_family("sd3"), star_folder, train_text_encoder=True, cache_text_embeddings=True,
              eval_prompt="")
    log = capfd.readouterr().err
    assert "text_encoder, text_encoder_2 encode every batch's captions" in log and "Text cache of text_encoder_3" in log
    lora = single_file(out)
    names = accepted_clip_names("StableDiffusion3Pipeline")
    text_keys = [k for k in lora if k.startswith("lora_te")]
    assert text_keys and all(k.rsplit(".", 2)[0] in names or k.rsplit(".", 1)[0] in names for k in text_keys)
    assert {k[:8] for k in text_keys} == {"lora_te1", "lora_te2"}


@pytest.mark.parametrize("kind", ["lora", "dora", "lokr", "loha"])
def test_each_type_trains_flux_with_its_clip_encoder(kind, tiny_family, star_folder, tmp_path):
    """Flux, every type, CLIP-L trained beside the frozen T5: the run ends, and the single file (for the
    types ComfyUI reads) holds only names ComfyUI maps for Flux: transformer.* and lora_te1_ (clip_l)."""
    model = tiny_family("flux")
    out = run(tmp_path, model, star_folder, lora_type=kind, train_text_encoder=True, eval_prompt="")
    saved = load_file(str(out / "test_lora" / WEIGHTS_NAME))
    assert any(k.startswith("text_encoder.") for k in saved) and not any(k.startswith("text_encoder_2.") for k in saved)
    path = out / "test_lora" / single_file_name("test_lora")
    assert path.is_file() == (kind != "dora")
    if kind != "dora":
        lora = load_file(str(path))
        config = family_for(str(model)).load(str(model), torch.float32).denoiser.config
        accepted = {**accepted_lora_names("folded", dict(config), is_flux=True), **accepted_clip_names("FluxPipeline")}
        patches, unloaded = (load_lora if kind == "lora" else load_lycoris)(lora, accepted)
        assert unloaded == [] and any(m.startswith("text_encoder.") for m in patches)


@pytest.mark.parametrize("kind", ["dora", "lokr", "loha"])
def test_pissa_and_olora_are_refused_for_other_types(kind, tiny_sd, star_folder, tmp_path):
    from diffusion_trainer.params import ParamsError, parse_params

    with pytest.raises(ParamsError, match=f"lora_init: .*lora_type '{kind}'"):
        parse_params(quick_params(tiny_sd, star_folder, tmp_path, lora_type=kind, lora_init="olora"))
    parse_params(quick_params(tiny_sd, star_folder, tmp_path, lora_type=kind, lora_init="default"))


def test_text_encoder_training_is_refused_under_deepspeed():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from diffusion_trainer.errors import InputError
    from diffusion_trainer.run import processes

    zero2 = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                            state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=2)))
    with pytest.raises(InputError, match="train_text_encoder: .*DeepSpeed"):
        processes.refuse_unsupported(zero2, train_text_encoder=True)
    processes.refuse_unsupported(zero2)
    processes.refuse_unsupported(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU), train_text_encoder=True)
