"""Text-encoder LoRA and the adapter types beyond LoRA (issue 21.1, 21.2), each trained for a few steps
on a tiny model: the text encoder's output changes and diffusers' load_lora_weights of the saved folder
draws the trained run's last eval image again; every single-file key is one ComfyUI maps, and ComfyUI's
weight change equals peft's; LoKr resumes exactly; PiSSA's adapter applies to the original base."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from comfyui_rules import (
    accepted_clip_names,
    accepted_lora_names,
    dora_weight,
    load_dora,
    load_lora,
    load_lycoris,
    lycoris_delta,
)
from conftest import quick_params, run_main, train, write_config
from PIL import Image
from safetensors.torch import load_file

from diffusion_trainer.errors import InputError
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
    modules = peft_loaded(model, kind, out, ("text_encoder", "text_encoder_2"))
    accepted = {**accepted_lora_names("kohya", dict(modules["unet"].config)),
                **accepted_clip_names("StableDiffusionXLPipeline")}
    patches, unloaded = load_lycoris(lora, accepted)
    assert unloaded == [] and {kind} == {p[0] for p in patches.values()}
    assert any(m.startswith("text_encoder_2.") for m in patches)
    for module, (_, parts, alpha) in patches.items():
        component, path = ("unet", module) if not module.startswith("text_encoder") else module.split(".", 1)
        expected = layer(modules[component], path).get_delta_weight("default").double()
        assert torch.allclose(lycoris_delta(kind, parts, alpha, expected.shape), expected, atol=1e-6), module


def peft_loaded(model, kind, out, text_encoders):
    """The base model's denoiser and `text_encoders`, by their prefix in the diffusers file, with the
    saved adapter put back into peft's layers (as peft names them: LoKr, LoHa, and Flux's DoRA)."""
    from peft.utils import set_peft_model_state_dict

    from diffusion_trainer.lora import TEXT_ENCODER_LAYERS, AdapterSpec, attach

    family = family_for(str(model)).load(str(model), torch.float32)
    saved = load_file(str(out / "test_lora" / WEIGHTS_NAME))
    modules = {family.lora_save_prefix: family.denoiser, **{a: getattr(family.pipeline, a) for a in text_encoders}}
    for component, module in modules.items():
        targets = family.lora_targets("default") if module is family.denoiser else TEXT_ENCODER_LAYERS["attention"]
        attach(module, AdapterSpec(kind, 4, 8), targets)
        state = {k.split(".", 1)[1]: v for k, v in saved.items() if k.split(".", 1)[0] == component}
        assert not set_peft_model_state_dict(module, state).unexpected_keys
    return modules


def layer(module, path):
    """A layer by the checkpoint's name; transformers 5's CLIPTextModel has no `text_model.` level."""
    try:
        return module.get_submodule(path)
    except AttributeError:
        return module.get_submodule(path.removeprefix("text_model."))


def peft_merged(module, path):
    """(the base weight, peft's merged DoRA weight m (W + dW) / ||W + dW|| of that layer)."""
    dora = layer(module, path)
    before = dora.get_base_layer().weight.detach().clone()
    dora.merge()
    return before, dora.get_base_layer().weight.detach().double()


def assert_dora_is_comfyuis(lora, accepted, components):
    """Every key is one ComfyUI maps, and ComfyUI's DoRA patch of each base weight with the file's
    lora_up/lora_down/alpha/dora_scale is peft's merged weight. `components`: the loaded modules by
    the first part of the module name ("text_encoder"), the denoiser under ""."""
    patches, unloaded = load_dora(lora, accepted)
    assert unloaded == [] and patches
    for module, (up, down, alpha, dora_scale) in patches.items():
        component, path = module.split(".", 1) if module.split(".", 1)[0] in components else ("", module)
        assert dora_scale is not None and dora_scale.shape == (up.shape[0], 1), module
        base, merged = peft_merged(components[component], path)
        assert torch.allclose(dora_weight(base, up, down, alpha, dora_scale), merged, rtol=0, atol=2e-7), module
    return patches


def test_dora_scale_gives_peft_weight_on_conv_square_and_fused_layers():
    """No preset puts DoRA on a conv, but its maths must hold there too (peft's conv magnitude is
    [1, out, 1, 1], ComfyUI's dora_scale [out, 1, 1, 1]); on a square linear the scale must still be
    on the output axis; FLUX.2's fused qkv takes its parts' dora_scale stacked, the final modulation's
    swapped like its ups."""
    from peft.utils import get_peft_model_state_dict

    from diffusion_trainer.lora import AdapterSpec, attach
    from diffusion_trainer.outputs.bfl_keys import to_bfl_lora
    from diffusion_trainer.outputs.dora import base_weight
    from diffusion_trainer.outputs.export import module_weights

    torch.manual_seed(0)
    attn = torch.nn.ModuleDict({p: torch.nn.Linear(6, 4) for p in ("to_q", "to_k", "to_v")})
    model = torch.nn.ModuleDict({"conv": torch.nn.Conv2d(3, 5, 3), "square": torch.nn.Linear(5, 5),
                                 "norm_out": torch.nn.ModuleDict({"linear": torch.nn.Linear(3, 4)}),
                                 "transformer_blocks": torch.nn.ModuleList([torch.nn.ModuleDict({"attn": attn})])})
    paths = ("conv", "square", "norm_out.linear", *(f"transformer_blocks.0.attn.{p}" for p in attn))
    attach(model, AdapterSpec("dora", 2, 4), paths)
    for name, weight in model.named_parameters():  # a trained-looking adapter: B and the magnitude moved
        if "lora_B" in name or "magnitude" in name:
            weight.data += 0.3 * torch.randn_like(weight)
    state = get_peft_model_state_dict(model)
    files = {p: module_weights("x", {k.removeprefix(p + "."): v for k, v in state.items() if k.startswith(p + ".")},
                               {"lora_alpha": 4, "r": 2}, False, base_weight(model, p)) for p in paths}
    bases = {p: base_weight(model, p).detach().clone() for p in paths}
    merged = {p: peft_merged(model, p)[1] for p in paths}
    for path in ("conv", "square"):
        w = files[path]
        assert w["x.dora_scale"].shape == (merged[path].shape[0],) + (1,) * (merged[path].dim() - 1)
        comfy = dora_weight(bases[path], w["x.lora_B.weight"], w["x.lora_A.weight"], None, w["x.dora_scale"])
        assert torch.allclose(comfy, merged[path], rtol=0, atol=2e-7), path
    fused = to_bfl_lora({p: (w["x.lora_A.weight"], w["x.lora_B.weight"]) for p, w in files.items() if "blocks" in p
                         or p == "norm_out.linear"}, {p: w["x.dora_scale"] for p, w in files.items()})
    qkv = "diffusion_model.double_blocks.0.img_attn.qkv"
    expected = torch.cat([merged[f"transformer_blocks.0.attn.{p}"] for p in attn])
    comfy = dora_weight(torch.cat([bases[f"transformer_blocks.0.attn.{p}"] for p in attn]),
                        fused[qkv + ".lora_B.weight"], fused[qkv + ".lora_A.weight"], None, fused[qkv + ".dora_scale"])
    assert torch.allclose(comfy, expected, rtol=0, atol=2e-7)
    final = "diffusion_model.final_layer.adaLN_modulation.1"
    swapped = lambda t: torch.cat(t.chunk(2)[::-1])  # noqa: E731
    comfy = dora_weight(swapped(bases["norm_out.linear"]), fused[final + ".lora_B.weight"],
                        fused[final + ".lora_A.weight"], None, fused[final + ".dora_scale"])
    assert torch.allclose(comfy, swapped(merged["norm_out.linear"]), rtol=0, atol=2e-7)


@pytest.mark.parametrize("kind, init", [("dora", "gaussian"), ("lora", "pissa")])
def test_dora_and_pissa_reload_in_diffusers_on_the_original_base(kind, init, tiny_sd, star_folder, tmp_path, capfd):
    """DoRA through diffusers' loader, and its single file as ComfyUI reads it, written by the run and
    by `export` (which loads the base model); PiSSA's adapter (the base changed while training)
    converted so the original base model plus the adapter draws what the trained run drew."""
    out = run(tmp_path, tiny_sd, star_folder, lora_type=kind, lora_init=init, lora_dropout=0.1)
    saved = load_file(str(out / "test_lora" / WEIGHTS_NAME))
    assert (kind == "dora") == any("lora_magnitude_vector" in k for k in saved)
    if init == "pissa":
        assert {t.shape[0] for k, t in saved.items() if "lora.down" in k or "lora_A" in k} == {8}  # rank 2 x 4
    pipe = base_pipeline(tiny_sd)
    pipe.load_lora_weights(str(out / "test_lora"), weight_name=WEIGHTS_NAME)
    assert np.abs(redraw(pipe).astype(int) - final_image(out).astype(int)).max() <= 1
    if kind == "dora":  # the single file, written by the run and by `export` (which loads the base model)
        import json

        from diffusion_trainer.outputs.export import export_adapter

        a1111 = "AUTOMATIC1111 (the single file): no: its Lora extension normalises dora_scale per input column"
        assert a1111 in capfd.readouterr().err  # the run says which loader misreads it, and so does the info file
        assert json.loads((out / "test_lora" / "tlab_adaptor_info.json").read_text())["loaders"][
            "AUTOMATIC1111 (the single file)"].startswith("no:")

        lora = single_file(out)
        exported, _ = export_adapter(out / "test_lora", output=tmp_path / "exported.safetensors")
        again = load_file(str(exported))
        assert again.keys() == lora.keys() and all(torch.equal(again[k], lora[k]) for k in lora)
        assert_dora_is_comfyuis(lora, accepted_lora_names("kohya", dict(pipe.unet.config)), {"": pipe.unet})


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
    """Flux, every type, CLIP-L trained beside the frozen T5: the run ends, and the single file holds
    only names ComfyUI maps for Flux: transformer.* and lora_te1_ (clip_l); DoRA's gives peft's weights,
    and diffusers reloads its text encoder's magnitudes."""
    model = tiny_family("flux")
    out = run(tmp_path, model, star_folder, lora_type=kind, train_text_encoder=True, eval_prompt="")
    saved = load_file(str(out / "test_lora" / WEIGHTS_NAME))
    assert any(k.startswith("text_encoder.") for k in saved) and not any(k.startswith("text_encoder_2.") for k in saved)
    lora = single_file(out)
    modules = peft_loaded(model, kind, out, ("text_encoder",)) if kind == "dora" else {}
    denoiser = modules["transformer"] if modules else family_for(str(model)).load(str(model), torch.float32).denoiser
    config = denoiser.config
    accepted = {**accepted_lora_names("folded", dict(config), is_flux=True), **accepted_clip_names("FluxPipeline")}
    if kind == "dora":
        patches = assert_dora_is_comfyuis(lora, accepted,
                                          {"": modules["transformer"], "text_encoder": modules["text_encoder"]})
        pipe = base_pipeline(model)  # diffusers puts the text encoder's magnitudes back (transformers wants ".weight")
        pipe.load_lora_weights(str(out / "test_lora"), weight_name=WEIGHTS_NAME)
        magnitudes = {"text_encoder." + n.removesuffix(".default_0.weight"): p
                      for n, p in pipe.text_encoder.named_parameters() if "lora_magnitude_vector" in n}
        assert magnitudes and all(torch.equal(p, saved.get(n + ".weight", saved.get(n))) for n, p in magnitudes.items())
    else:
        patches, unloaded = (load_lora if kind == "lora" else load_lycoris)(lora, accepted)
        assert unloaded == []
    assert any(m.startswith("text_encoder.") for m in patches)


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


def test_a_flux2_lokr_writes_no_single_file_and_says_why(tiny_family, star_folder, tmp_path, capfd):
    """FLUX.2's single file names BFL's fused q/k/v layers, on which a LoKr of each cannot be expressed:
    the folder is written, the single file is not, and the log, the info file and export say so."""
    import json

    from diffusion_trainer.outputs.export import export_adapter

    out = run(tmp_path, tiny_family("flux2_klein"), star_folder, lora_type="lokr", max_train_steps=1, eval_prompt="")
    err = capfd.readouterr().err
    adapter = out / "test_lora"
    assert (adapter / WEIGHTS_NAME).is_file() and not (adapter / single_file_name("test_lora")).exists()
    assert "lora_type=lokr: ComfyUI (the single file): no: no single file is written" in err
    info = json.loads((adapter / "tlab_adaptor_info.json").read_text())
    assert info["loaders"]["ComfyUI (the single file)"].startswith("no: no single file is written: lokr cannot")
    with pytest.raises(InputError, match=r"adapter_dir: .* is a lokr adapter of FLUX.2 \[klein\]: .*fused q/k/v"):
        export_adapter(adapter)
