"""The single-file adapter for ComfyUI, A1111/Forge and civitai, per family: every key names a module
ComfyUI maps, ComfyUI's weight change equals the PEFT LoRA's, diffusers reads the file to the same
images, the header has kohya's and ModelSpec's metadata; and `main.py export` for older folders."""

from __future__ import annotations

import json

import pytest
import torch
from comfyui_rules import accepted_lora_names, load_lora, weight_delta
from conftest import quick_params, run_main, train
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffusion_trainer.families import family_for
from diffusion_trainer.families.chroma import APPROXIMATOR
from diffusion_trainer.families.qwen_image import MLP as QWEN_MLP
from diffusion_trainer.families.sd import StableDiffusion
from diffusion_trainer.families.sd3 import sd3_model_type
from diffusion_trainer.families.z_image import ATTENTION as Z_IMAGE_ATTENTION
from diffusion_trainer.families.z_image import MLP as Z_IMAGE_MLP
from diffusion_trainer.lora import attach_lora
from diffusion_trainer.outputs.adapter import save_adapter
from diffusion_trainer.outputs.export import tag_frequency
from diffusion_trainer.outputs.layout import INFO_NAME, WEIGHTS_NAME, single_file_name
from diffusion_trainer.params import parse_params
from diffusion_trainer.run import loop
from diffusion_trainer.run.train import adapter_info

CAPTIONS = ["sks, a star, purple", "sks, a star", "a blue square"]
UNET_ATTENTION = ("to_k", "to_q", "to_v", "to_out.0")
JOINT_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                   "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
# More than attention, as the wider lora_layers choices train: feed-forward, the attention blocks'
# projections (1x1 convs in the tiny SD UNet) and the resnets' time projections…
SD_WIDE = (*UNET_ATTENTION, "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "time_emb_proj")


def all_linear(denoiser):
    """…and every linear layer of the denoiser ("all-linear")."""
    return tuple(name for name, m in denoiser.named_modules() if isinstance(m, torch.nn.Linear))


def chroma_all_linear(denoiser):
    """Chroma's all-linear: every linear layer but the distilled guidance layer, which ComfyUI's
    Flux map (Chroma's in ComfyUI) has no name for."""
    return tuple(name for name in all_linear(denoiser) if not name.startswith(APPROXIMATOR))


CASES = {"sd": ("sd", UNET_ATTENTION), "sd_wide": ("sd", SD_WIDE), "sdxl": ("sdxl", UNET_ATTENTION),
         "sdxl_all_linear": ("sdxl", all_linear), "sd3": ("sd3", JOINT_ATTENTION),
         "sd3_all_linear": ("sd3", all_linear), "flux": ("flux", JOINT_ATTENTION), "flux_all_linear": ("flux", all_linear),
         # issue 22
         "chroma": ("chroma", JOINT_ATTENTION), "chroma_all_linear": ("chroma", chroma_all_linear),
         "z_image": ("z_image", Z_IMAGE_ATTENTION + Z_IMAGE_MLP),
         "z_image_all_linear": ("z_image", all_linear), "qwen_image": ("qwen_image", JOINT_ATTENTION + QWEN_MLP),
         "qwen_image_all_linear": ("qwen_image", all_linear)}
# ComfyUI's transformer map for each family (comfyui_rules.COMFY_TRANSFORMER_MAPS)
COMFY_ARCHITECTURE = {"StableDiffusion3": "sd3", "Flux": "flux", "Chroma": "flux", "ZImage": "z_image",
                      "QwenImage": "qwen_image"}
NEW_FAMILIES = ["chroma", "z_image", "qwen_image"]


def model_path(case, tiny_sd, tiny_family):
    name = CASES[case][0]
    return tiny_sd if name == "sd" else tiny_family(name)


def draw(pipe):
    # the tiny tokenizers' lengths (T5: 32, Qwen: 64)
    extra = {"FluxPipeline": {"max_sequence_length": 32}, "ChromaPipeline": {"max_sequence_length": 32},
             "ZImagePipeline": {"max_sequence_length": 64}}.get(type(pipe).__name__, {})
    return pipe("a sks star", num_inference_steps=1, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0), **extra).images


@pytest.fixture(scope="module")
def saved(tiny_sd, tiny_family, star_folder, tmp_path_factory):
    """case -> (family with its PEFT LoRA, adapter folder): rank 4, alpha 8, random non-zero LoRA
    weights, saved through outputs.adapter.save_adapter as a run saves them."""
    out = {}
    for case, (_, targets) in CASES.items():
        model = model_path(case, tiny_sd, tiny_family)
        family = family_for(str(model)).load(str(model), torch.float32)
        attach_lora(family.denoiser, 4, 8, targets(family.denoiser) if callable(targets) else targets)
        generator = torch.Generator().manual_seed(0)
        for name, weight in family.denoiser.named_parameters():
            if "lora_" in name:
                weight.data = torch.randn(weight.shape, generator=generator) * 0.1
        folder = tmp_path_factory.mktemp(case)
        params = parse_params(quick_params(model, star_folder, folder, adaptor_name=f"{case}_lora",
                                           trigger_word="sks"))[0]
        info = adapter_info(family, params, loop.Outcome(steps=7, epochs=1), family.model_prediction_type())
        adapter = save_adapter(folder / params.adaptor_name, family, params.adaptor_name, info, None, CAPTIONS)
        out[case] = (family, adapter)
    return out


def single_file(adapter):
    return adapter / f"{adapter.name}.safetensors"


@pytest.mark.parametrize("case", list(CASES))
def test_every_key_maps_to_a_module_comfyui_accepts_with_the_trained_weight_change(saved, case):
    family, adapter = saved[case]
    lora = load_file(str(single_file(adapter)))
    accepted = accepted_lora_names(family.single_file_form, dict(family.denoiser.config),
                                   architecture=COMFY_ARCHITECTURE.get(type(family).__name__))
    patches, not_loaded = load_lora(lora, accepted)
    assert not_loaded == []  # ComfyUI would warn "lora key not loaded" for each of these
    layers = {name: module for name, module in family.denoiser.named_modules() if isinstance(module, LoraLayer)}
    assert set(patches) == set(layers)
    for name, layer in layers.items():
        up, down, alpha = patches[name]
        comfy = weight_delta(up, down, alpha, layer.get_base_layer().weight.shape)
        torch.testing.assert_close(comfy.float(), layer.get_delta_weight("default"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_comfyui_map_covers_every_linear_and_conv_layer_of_the_denoiser(saved, case):
    """The helper's map (ComfyUI's, from the model's structure) names real modules: every linear or
    conv layer a LoRA could target, so the test above can fail only on our keys."""
    family, _ = saved[case]
    accepted = set(accepted_lora_names(family.single_file_form, dict(family.denoiser.config),
                                       architecture=COMFY_ARCHITECTURE.get(type(family).__name__)).values())
    layers = {name.removesuffix(".base_layer") for name, m in family.denoiser.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and ".lora_" not in name
              and not (type(family).__name__ == "Chroma" and name.startswith(APPROXIMATOR))}  # see chroma_all_linear
    assert layers - accepted == set()


@pytest.mark.parametrize("case", ["sd", "sdxl", "sd3", "flux", *NEW_FAMILIES])
def test_file_form_per_family(saved, case):
    family, adapter = saved[case]
    lora = load_file(str(single_file(adapter)))
    with safe_open(str(single_file(adapter)), "pt") as handle:
        header = handle.metadata()
    if case in ("sd", "sdxl"):
        assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
                   for k in lora)
        assert {v.item() for k, v in lora.items() if k.endswith(".alpha")} == {8.0}  # trained alpha, not rank
    else:
        assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in lora)
        assert "lora_adapter_metadata" not in header  # diffusers refuses a file with alpha and metadata
    assert f"`{case}_lora.safetensors`" in (adapter / "README.md").read_text()  # the model card says which file


@pytest.mark.parametrize("case", ["sd", "sdxl", "sd3", "flux"])  # NEW_FAMILIES: in test_new_families.py
def test_diffusers_reads_the_single_file_to_the_same_images(saved, case):
    family, adapter = saved[case]
    pipe = type(family).load(family.source, torch.float32).pipeline
    pipe.load_lora_weights(str(adapter), weight_name=WEIGHTS_NAME)
    with_folder = draw(pipe)
    pipe.unload_lora_weights()
    base = draw(pipe)
    pipe.load_lora_weights(str(adapter), weight_name=single_file(adapter).name)
    with_file = draw(pipe)
    assert abs(with_folder - base).mean() > 1e-4  # the LoRA changes the picture…
    assert abs(with_file - with_folder).max() < 1e-4  # …and both files change it alike


EXPECTED_VERSION = {"sd": ("sd_v1", "stable-diffusion-v1/lora", "False"),
                    "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "False"),
                    "sd3": ("m", "stable-diffusion-3-m/lora", "False"),
                    "flux": ("flux1", "flux-1-dev/lora", "False"), "chroma": ("chroma", "chroma/lora", "False"),
                    "z_image": ("z_image", "z-image/lora", "False"),
                    "qwen_image": ("qwen_image", "qwen-image/lora", "False")}


@pytest.mark.parametrize("case", ["sd", "sdxl", "sd3", "flux", *NEW_FAMILIES])
def test_header_has_kohya_and_modelspec_metadata(saved, case):
    _, adapter = saved[case]
    with safe_open(str(single_file(adapter)), "pt") as handle:
        header = handle.metadata()
    version, architecture, v2 = EXPECTED_VERSION[case]
    assert header["ss_base_model_version"] == version
    assert header["modelspec.architecture"] == architecture
    assert header["ss_v2"] == v2
    assert (header["ss_network_module"], header["ss_network_dim"], header["ss_network_alpha"]) == ("networks.lora",
                                                                                                   "4", "8")
    assert header["ss_output_name"] == header["modelspec.title"] == f"{case}_lora"
    assert json.loads(header["ss_tag_frequency"]) == {"stars": {"sks": 2, "a star": 2, "purple": 1, "a blue square": 1}}
    assert (header["ss_resolution"], header["modelspec.resolution"]) == ("(64, 64)", "64x64")
    assert (header["ss_num_train_images"], header["ss_steps"]) == ("3", "7")
    assert header["modelspec.sai_model_spec"] == "1.0.0"
    assert header["modelspec.trigger_phrase"] == "sks"
    assert header["modelspec.date"][:4].isdigit()
    if case in ("sd", "sdxl"):
        assert header["modelspec.prediction_type"] == "epsilon"


def test_sd_version_from_the_text_width_or_prediction_type():
    meta = StableDiffusion.base_model_metadata
    assert meta({"cross_attention_dim": 768}, "epsilon")["ss_base_model_version"] == "sd_v1"
    v2 = meta({"cross_attention_dim": 1024}, "v_prediction")
    assert (v2["ss_base_model_version"], v2["ss_v2"], v2["modelspec.architecture"], v2["modelspec.prediction_type"]) == (
        "sd_v2", "True", "stable-diffusion-v2-768-v/lora", "v")
    assert meta({"cross_attention_dim": 1024}, "epsilon")["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    assert meta({}, "v_prediction")["ss_base_model_version"] == "sd_v2"
    assert [sd3_model_type(c) for c in ({"num_layers": 24}, {"num_layers": 24, "dual_attention_layers": [0]},
                                        {"num_layers": 38})] == ["m", "m3.5", "l"]


def test_tag_frequency_and_file_name_rules():
    assert tag_frequency(["a, b", "b ,c", ""]) == {"b": 2, "a": 1, "c": 1}
    assert single_file_name("pytorch_lora_weights") != WEIGHTS_NAME


# --- the export command ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def old_folder(tiny_sd, star_folder, tmp_path_factory):
    """A trained SD adapter folder as an earlier version left it: no single file."""
    code, out = train(tmp_path_factory.mktemp("old"), tiny_sd, star_folder, num_train_epochs=1, max_train_steps=1)
    assert code == 0
    adapter = out / "test_lora"
    written = adapter / "test_lora.safetensors"
    assert written.is_file()  # this version writes it in the run's own save…
    reference = load_file(str(written))
    written.unlink()  # …which older versions did not
    return adapter, reference


def test_export_writes_the_single_file_an_old_folder_lacked(old_folder):
    adapter, reference = old_folder
    assert run_main(["export", str(adapter)]) == 0
    exported = load_file(str(adapter / "test_lora.safetensors"))
    assert exported.keys() == reference.keys()
    assert all(torch.equal(exported[k], reference[k]) for k in reference)
    with safe_open(str(adapter / "test_lora.safetensors"), "pt") as handle:
        header = handle.metadata()
    assert header["ss_base_model_version"] == "sd_v1" and json.loads(header["ss_tag_frequency"])["stars"]


def test_export_diffusers_form_keeps_alpha_in_the_header(old_folder, tmp_path):
    adapter, _ = old_folder
    target = tmp_path / "copy.safetensors"
    assert run_main(["export", str(adapter), "--format", "diffusers", "--output", str(target)]) == 0
    with safe_open(str(target), "pt") as handle:
        config = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert (config["unet.r"], config["unet.lora_alpha"]) == (4, 8)
    assert load_file(str(target)).keys() == load_file(str(adapter / WEIGHTS_NAME)).keys()


def test_export_refuses_a_folder_that_is_not_an_adapter(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert run_main(["export", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not an adapter folder" in err and WEIGHTS_NAME in err and INFO_NAME in err
    assert run_main(["export", str(tmp_path / "missing")]) == 2
    assert "there is no folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing written


def test_export_refuses_weights_it_cannot_convert(old_folder, tmp_path, capsys):
    adapter, _ = old_folder
    (tmp_path / INFO_NAME).write_text((adapter / INFO_NAME).read_text())
    save_file({"not_a_lora.weight": torch.zeros(2, 3)}, str(tmp_path / WEIGHTS_NAME))
    assert run_main(["export", str(tmp_path)]) == 2
    assert "could not be converted for Stable Diffusion 1.x/2.x" in capsys.readouterr().err
