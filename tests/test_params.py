"""The one schema: defaults, coercion of Lab strings, errors, and index.json / docs agreeing."""

from __future__ import annotations

import json
import re

import pytest
from conftest import ROOT
from werkzeug.utils import secure_filename

from diffusion_trainer.lab import manifest
from diffusion_trainer.params import FIELDS, ParamsError, parse_params

REQUIRED = {"adaptor_name": "a", "model_name": "owner/model", "dataset_name": "some/dataset"}

# The seed defaults, as the issue lists them.
SEED_DEFAULTS = {
    "trigger_word": "", "num_train_epochs": 100, "train_batch_size": 1, "gradient_accumulation_steps": 1,
    "caption_column": "text", "image_column": "image", "caption_dropout_rate": 0.0, "resolution": 512,
    "center_crop": False, "image_interpolation_mode": "lanczos", "random_flip": False, "color_jitter": False,
    "color_jitter_brightness": 0.1, "color_jitter_contrast": 0.1, "color_jitter_saturation": 0.1,
    "color_jitter_hue": 0.05, "random_rotation": False, "rotation_degrees": 5, "rotation_prob": 0.3,
    "lora_r": 8, "lora_alpha": 16, "learning_rate": 1e-4, "lr_scheduler": "constant", "lr_warmup_steps": 50,
    "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_weight_decay": 0.01, "adam_epsilon": 1e-8,
    "max_grad_norm": 1.0, "loss_type": "l2", "huber_c": 0.1, "prediction_type": "auto", "snr_gamma": 0,
    "min_snr_gamma": 0, "noise_offset": 0, "mixed_precision": "no",
    "enable_xformers_memory_efficient_attention": False, "gradient_checkpointing": False, "use_ema": False,
    "ema_decay": 0.9999, "eval_prompt": "", "eval_steps": 1, "eval_num_inference_steps": 50,
    "eval_guidance_scale": 0.0, "log_to_wandb": True, "output_dir": "./output",
}  # issue 10: prediction_type 'auto' (the model's own), eval_guidance_scale 0 (the pipeline's own)

# The predecessor plugin's manifest: saved jobs use these names, types and enums.
PREDECESSOR = {
    "adaptor_name": "string", "trigger_word": "string", "num_train_epochs": "integer", "train_batch_size": "integer",
    "gradient_accumulation_steps": "integer", "caption_column": "string", "image_column": "string",
    "caption_dropout_rate": "number", "resolution": "integer", "center_crop": "boolean",
    "image_interpolation_mode": "string", "random_flip": "boolean", "color_jitter": "boolean",
    "color_jitter_brightness": "number", "color_jitter_contrast": "number", "color_jitter_saturation": "number",
    "color_jitter_hue": "number", "random_rotation": "boolean", "rotation_degrees": "number",
    "rotation_prob": "number", "lora_r": "integer", "lora_alpha": "integer", "learning_rate": "number",
    "lr_scheduler": "string", "lr_warmup_steps": "integer", "adam_beta1": "number", "adam_beta2": "number",
    "adam_weight_decay": "number", "adam_epsilon": "number", "max_grad_norm": "number", "loss_type": "string",
    "huber_c": "number", "prediction_type": "string", "snr_gamma": "number", "min_snr_gamma": "number",
    "noise_offset": "number", "mixed_precision": "string", "enable_xformers_memory_efficient_attention": "boolean",
    "gradient_checkpointing": "boolean", "use_ema": "boolean", "ema_decay": "number", "eval_prompt": "string",
    "eval_steps": "integer", "eval_num_inference_steps": "integer", "eval_guidance_scale": "number",
    "log_to_wandb": "boolean",
}
PREDECESSOR_ENUMS = {
    "image_interpolation_mode": ["lanczos", "bilinear", "bicubic", "nearest"],
    "lr_scheduler": ["constant", "linear", "cosine", "constant_with_warmup"],
    "loss_type": ["l2", "huber"], "prediction_type": ["auto", "epsilon", "v_prediction"],  # 'auto' added by issue 10
    "mixed_precision": ["no", "fp16", "bf16"],
}


def parse(**values):
    return parse_params({**REQUIRED, **values})


def test_defaults_are_the_seed_defaults():
    params, warnings = parse()
    assert not warnings
    for name, value in SEED_DEFAULTS.items():
        assert getattr(params, name) == value, name
    assert params.max_train_steps == 0 and isinstance(params.seed, int)


def test_lab_strings_are_coerced_and_false_means_false():
    params, _ = parse(num_train_epochs="3", learning_rate="1e-4", center_crop="false", random_flip="true",
                      lora_r="8.0", snr_gamma="", noise_offset="0.05", mixed_precision="BF16", use_ema="False",
                      eval_steps=" 2 ", log_to_wandb="false")
    assert (params.num_train_epochs, params.learning_rate, params.lora_r, params.eval_steps) == (3, 1e-4, 8, 2)
    assert params.center_crop is False and params.random_flip is True and params.use_ema is False
    assert params.log_to_wandb is False and params.snr_gamma == 0 and params.noise_offset == 0.05
    assert params.mixed_precision == "bf16"


def test_lab_bookkeeping_keys_are_accepted_quietly_and_unknown_keys_get_a_suggestion():
    from diffusion_trainer.lab.keys import is_bookkeeping

    _, warnings = parse_params({**REQUIRED, **dict(
        job_id="12", model_path="", model_architecture="StableDiffusionPipeline", adaptor_output_dir="/x",
        template_name="t", type="LoRA", embedding_model="e", run_sweeps=False, learnin_rate="0.1", zzz=1)},
        is_bookkeeping)
    assert warnings == ["Unknown parameter 'learnin_rate' is ignored. Did you mean 'learning_rate'?",
                        "Unknown parameter 'zzz' is ignored."]


def test_every_problem_is_listed_at_once_naming_the_parameter():
    with pytest.raises(ParamsError) as caught:
        parse_params({"adaptor_name": "my lora", "dataset_name": "d", "resolution": 500, "lr_scheduler": "cosin",
                      "num_train_epochs": 0, "learning_rate": "fast", "caption_column": "image",
                      "snr_gamma": 5, "min_snr_gamma": 3, "rotation_prob": 2})
    problems = dict(p.split(":", 1) for p in caught.value.problems)
    assert set(problems) == {"adaptor_name", "model_name", "resolution", "lr_scheduler", "num_train_epochs",
                             "learning_rate", "image_column", "min_snr_gamma", "rotation_prob"}
    assert "multiple of 8" in problems["resolution"] and "496 or 504" in problems["resolution"]
    assert "'constant', 'linear', 'cosine' or 'constant_with_warmup'" in problems["lr_scheduler"]
    assert "required" in problems["model_name"]
    assert "less than or equal to 1" in problems["rotation_prob"]


@pytest.mark.parametrize("name", ["sks_star", "lora-v1.2", "A1", "x", "my-style-"])
def test_adaptor_names_the_lab_finds_unchanged_are_accepted(name):
    assert parse(adaptor_name=name)[0].adaptor_name == name
    assert secure_filename(name) == name


@pytest.mark.parametrize("name", ["my lora", "a/b", "..", "../x", "/abs", "x_", ".hidden", "_x", "ünï", "", "a\\b",
                                  "x" * 129])
def test_adaptor_names_that_would_be_lost_are_rejected(name):
    with pytest.raises(ParamsError) as caught:
        parse(adaptor_name=name)
    assert caught.value.problems[0].startswith("adaptor_name:")


def test_index_json_is_generated_from_the_schema():
    assert manifest.main(["--check"]) == 0
    index = json.loads((ROOT / "index.json").read_text())
    for name, entry in index["parameters"].items():
        field = FIELDS[name]
        assert entry["default"] == ("" if field.is_required() else field.default), name
        assert entry.get("required", False) is field.is_required(), name


def test_index_json_keeps_every_predecessor_parameter_with_its_type_and_enum():
    parameters = json.loads((ROOT / "index.json").read_text())["parameters"]
    for name, json_type in PREDECESSOR.items():
        assert parameters[name]["type"] == json_type, name
    for name, values in PREDECESSOR_ENUMS.items():
        assert parameters[name]["enum"] == values
    assert parameters["adaptor_name"]["required"] is True


def test_index_json_is_a_loadable_lab_trainer_manifest():
    index = json.loads((ROOT / "index.json").read_text())
    for key in ("name", "uniqueId", "description", "plugin-format", "type", "version", "files", "setup-script",
                "supported_hardware_architectures", "parameters", "parameters_ui"):
        assert key in index, key
    # our own id: the plugin Lab auto-updates a plugin whose id matches its built-in "diffusion_trainer"
    assert index["uniqueId"] == "diffusion_lora_trainer" and index["type"] == "trainer"
    from diffusion_trainer.families import FAMILIES  # every family the trainer has, in the registry's order

    assert index["model_architectures"] == list(FAMILIES)
    assert set(index["supported_hardware_architectures"]) <= {"cuda", "mlx", "cpu", "amd"}
    for path in index["files"]:
        assert (ROOT / path).is_file(), path
    package = {p.relative_to(ROOT).as_posix() for p in (ROOT / "diffusion_trainer").rglob("*.py")}
    assert package <= set(index["files"])


def test_info_md_and_readme_document_every_parameter():
    info = (ROOT / "info.md").read_text()
    readme = (ROOT / "README.md").read_text()
    for name in FIELDS:
        assert re.search(rf"`{name}`", info), f"info.md does not mention {name}"
        assert re.search(rf"`{name}`", readme), f"README.md does not mention {name}"
