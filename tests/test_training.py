"""End to end through main.py on a tiny SD 1.x pipeline: what a user gets on disk."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import quick_params, run_main, train, write_config
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffusion_trainer.families.sd import StableDiffusion

PROMPT = "a sks star"


def generate(pipe, prompt=PROMPT):
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=3, generator=generator, output_type="np",
                height=64, width=64).images


def lora_layers(pipe):
    return [m for m in pipe.unet.modules() if isinstance(getattr(m, "scaling", None), dict) and m.scaling]


def tensorboard_scalars(logs_dir, tag):
    values = []
    for events in logs_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values += [(e.step, e.value) for e in acc.Scalars(tag)]
    return sorted(values)


def test_adapter_loads_into_a_fresh_pipeline_and_changes_its_output(tmp_path, tiny_sd, star_folder):
    code, out = train(tmp_path, tiny_sd, star_folder, lora_r=4, lora_alpha=16, num_train_epochs=3,
                      eval_prompt=PROMPT, eval_steps=1, trigger_word="sks")
    assert code == 0
    adapter = out / "test_lora"
    assert (adapter / "pytorch_lora_weights.safetensors").is_file()
    assert (adapter / "README.md").read_text().startswith("# test_lora")
    info = json.loads((adapter / "tlab_adaptor_info.json").read_text())
    assert info["model_architecture"] == "StableDiffusionPipeline"
    assert info["lora_config"]["r"] == 4 and info["lora_config"]["lora_alpha"] == 16
    assert info["trigger_word"] == "sks" and info["steps_trained"] == 12  # 3 epochs x 8 images / batch 2
    assert info["parameters"]["learning_rate"] == 1e-3

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
    pipe.set_progress_bar_config(disable=True)
    before = generate(pipe)
    pipe.load_lora_weights(str(adapter))
    after = generate(pipe)
    assert abs(after - before).mean() > 1e-4
    # alpha survived the round trip: scale = alpha / r = 4, not the 1 diffusers assumes without metadata
    scales = {s for layer in lora_layers(pipe) for s in layer.scaling.values()}
    assert scales == {4.0}

    eval_dir = out / "eval_images" / "test_lora"
    assert sorted(p.name for p in eval_dir.glob("*.png")) == ["before.png", "epoch_0001.png", "epoch_0002.png", "final.png"]
    losses = tensorboard_scalars(out / "logs" / "test_lora", "loss")
    assert losses and losses[-1][0] == 12


def test_loss_falls_on_a_small_overfit_run(tmp_path, tiny_sd, star_folder):
    code, out = train(tmp_path, tiny_sd, star_folder, train_batch_size=4, num_train_epochs=100,
                      max_train_steps=200, learning_rate=2e-3)
    assert code == 0
    losses = [loss for _, loss in tensorboard_scalars(out / "logs" / "test_lora", "loss")]
    assert len(losses) >= 20  # every 10 steps, and once a second when steps are slower
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.85 * first, losses


def test_same_seed_gives_the_same_adapter_and_another_seed_does_not(tmp_path, tiny_sd, star_folder):
    weights = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        code, out = train(tmp_path / name, tiny_sd, star_folder, seed=seed)
        assert code == 0
        weights.append(load_file(out / "test_lora" / "pytorch_lora_weights.safetensors"))
    same = all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    different = any(not torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    assert same and different


def test_set_overrides_the_config_file(tmp_path, tiny_sd, star_folder):
    config = write_config(tmp_path / "run.json", quick_params(tiny_sd, star_folder, tmp_path / "out"))
    code = run_main(["--config", str(config), "--set", "adaptor_name=renamed", "--set", "num_train_epochs=1"])
    assert code == 0
    info = json.loads((tmp_path / "out" / "renamed" / "tlab_adaptor_info.json").read_text())
    assert info["steps_trained"] == 4


def test_bad_parameters_are_all_listed_and_nothing_is_written(tmp_path, tiny_sd, star_folder, capsys):
    params = quick_params(tiny_sd, star_folder, tmp_path / "out", adaptor_name="../escape", resolution=100,
                          lr_scheduler="cosin", num_train_epochs=0, noise_offset="lots")
    code = run_main(["--config", str(write_config(tmp_path / "bad.json", params))])
    err = capsys.readouterr().err
    assert code == 2
    for name in ("adaptor_name", "resolution", "lr_scheduler", "num_train_epochs", "noise_offset"):
        assert f"- {name}:" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad, message", [
    ({"dataset_name": "/no/such/folder"}, "dataset_name: there is no folder"),
    ({"model_name": "/no/such/model"}, "model_name: there is no folder"),
    ({"caption_column": "caption"}, "caption_column: 'caption' is not a column of"),
    ({"image_column": "picture"}, "image_column: 'picture' is not a column of"),
])
def test_bad_inputs_name_the_parameter_before_loading_anything(tmp_path, tiny_sd, star_imagefolder, capsys, bad,
                                                               message):
    code, out = train(tmp_path, tiny_sd, star_imagefolder, **bad)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()


def test_unsupported_pipeline_class_is_named(tmp_path, tiny_sd, star_folder, capsys):
    other = tmp_path / "other_model"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    code, _ = train(tmp_path, other, star_folder)
    err = capsys.readouterr().err
    assert code == 2 and "is a KandinskyPipeline; this trainer supports" in err and "StableDiffusionPipeline" in err


def test_wishes_this_machine_cannot_grant_warn_and_the_run_goes_on(tmp_path, tiny_sd, star_folder, capsys):
    code, out = train(tmp_path, tiny_sd, star_folder, mixed_precision="fp16",
                      enable_xformers_memory_efficient_attention=True, learnin_rate=0.1)
    err = capsys.readouterr().err
    assert code == 0 and (out / "test_lora" / "pytorch_lora_weights.safetensors").is_file()
    cuda = torch.cuda.is_available()
    # fp16 is granted on a GPU and refused (fp32) elsewhere; the log says which weights were loaded
    assert f"(base weights {'float16' if cuda else 'float32'})" in err
    assert ("fp16 needs a CUDA GPU" in err) is not cuda
    assert ("enable_xformers_memory_efficient_attention needs a CUDA GPU" in err) is not cuda
    assert "Unknown parameter 'learnin_rate' is ignored. Did you mean 'learning_rate'?" in err


def test_the_models_own_prediction_type_is_kept_unless_another_is_asked_for(tmp_path, tiny_sd_v, star_folder, capsys):
    code, out = train(tmp_path / "own", tiny_sd_v, star_folder, num_train_epochs=1)
    err = capsys.readouterr().err
    assert code == 0 and "prediction_type" not in err
    info = json.loads((out / "test_lora" / "tlab_adaptor_info.json").read_text())
    assert info["prediction_type"] == "v_prediction"

    code, out = train(tmp_path / "asked", tiny_sd_v, star_folder, num_train_epochs=1, prediction_type="epsilon")
    err = capsys.readouterr().err
    assert code == 0 and "prediction_type=epsilon but this base model was trained with v_prediction" in err
    assert json.loads((out / "test_lora" / "tlab_adaptor_info.json").read_text())["prediction_type"] == "epsilon"


def test_a_lab_form_run_on_a_v_prediction_model_trains_v_prediction(tmp_path, tiny_sd_v, star_folder, capsys):
    """The Lab sends every form value as a string, prediction_type included, at the form's default."""
    from conftest import ROOT

    form = json.loads((ROOT / "index.json").read_text())["parameters"]
    config = {key: str(value).lower() if isinstance(value, bool) else str(value)
              for key, value in quick_params(tiny_sd_v, star_folder, tmp_path / "output", num_train_epochs=1).items()}
    config["prediction_type"] = form["prediction_type"]["default"]
    assert run_main(["--config", str(write_config(tmp_path / "lab.json", config))]) == 0
    assert "prediction_type" not in capsys.readouterr().err
    info = json.loads((tmp_path / "output" / "test_lora" / "tlab_adaptor_info.json").read_text())
    assert info["prediction_type"] == "v_prediction"


def test_ema_weights_differ_from_the_raw_ones_and_are_the_saved_ones(tmp_path, tiny_sd, star_folder):
    raw_code, raw_out = train(tmp_path / "raw", tiny_sd, star_folder, num_train_epochs=4)
    ema_code, ema_out = train(tmp_path / "ema", tiny_sd, star_folder, num_train_epochs=4, use_ema=True,
                              ema_decay=0.99)
    assert raw_code == ema_code == 0
    raw = load_file(raw_out / "test_lora" / "pytorch_lora_weights.safetensors")
    ema = load_file(ema_out / "test_lora" / "pytorch_lora_weights.safetensors")
    ups = [k for k in raw if "lora.up" in k or "lora_B" in k]
    assert ups
    # LoRA "up" matrices start at zero; an average of their path lags behind where they ended.
    raw_norm = sum(raw[k].norm() for k in ups)
    ema_norm = sum(ema[k].norm() for k in ups)
    assert 0 < ema_norm < raw_norm


def test_gradient_clipping_bounds_every_step(tmp_path, tiny_sd, star_folder, monkeypatch):
    norms = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    code, _ = train(tmp_path, tiny_sd, star_folder, max_grad_norm=1e-4)
    assert code == 0 and len(norms) == 8
    assert max(norms) <= 1e-4 * 1.001


def test_gradient_checkpointing_is_on_in_the_denoiser_and_trains_to_the_same_adapter(tmp_path, tiny_sd, star_folder,
                                                                                     monkeypatch):
    enabled = []
    predict = StableDiffusion.predict

    def recording(self, denoiser, noisy, conditioning, batch):
        enabled.append(self.denoiser.is_gradient_checkpointing)
        return predict(self, denoiser, noisy, conditioning, batch)

    monkeypatch.setattr(StableDiffusion, "predict", recording)
    outs = []
    for name, checkpointing in (("plain", False), ("checkpointed", True)):
        enabled.clear()
        code, out = train(tmp_path / name, tiny_sd, star_folder, gradient_checkpointing=checkpointing)
        assert code == 0 and enabled and set(enabled) == {checkpointing}
        outs.append(load_file(out / "test_lora" / "pytorch_lora_weights.safetensors"))
    assert all(torch.allclose(outs[0][k], outs[1][k], atol=1e-5) for k in outs[0])


def test_a_failed_save_fails_the_run_and_leaves_no_adapter(tmp_path, tiny_sd, star_folder, monkeypatch, capsys):
    def broken_save(self, directory, metadata):
        (directory / "pytorch_lora_weights.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(StableDiffusion, "save_adapter", broken_save)
    code, out = train(tmp_path, tiny_sd, star_folder, num_train_epochs=1)
    assert code == 1 and "disk full" in capsys.readouterr().err
    assert not (out / "test_lora").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".test_lora")]


def test_bf16_trains_with_lora_weights_in_fp32(tmp_path, tiny_sd, star_folder):
    code, out = train(tmp_path, tiny_sd, star_folder, mixed_precision="bf16", num_train_epochs=1)
    assert code == 0
    weights = load_file(out / "test_lora" / "pytorch_lora_weights.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}


def test_wandb_offline_mode_logs_without_an_account(tmp_path, tiny_sd, star_folder, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    code, out = train(tmp_path, tiny_sd, star_folder, num_train_epochs=1, log_to_wandb=True)
    assert code == 0
    runs = list((out / "logs" / "test_lora" / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))


def test_wandb_without_a_key_warns_and_carries_on(tmp_path, tiny_sd, star_folder, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    code, out = train(tmp_path, tiny_sd, star_folder, num_train_epochs=1, log_to_wandb=True)
    assert code == 0 and (out / "test_lora" / "pytorch_lora_weights.safetensors").is_file()
    assert "log_to_wandb is on but W&B is not configured" in capsys.readouterr().err
    assert not (out / "logs" / "test_lora" / "wandb").exists()


def test_pickled_weights_are_refused_safetensors_only(tmp_path, star_folder, capsys):
    from diffusion_trainer.demo.tiny_models import tiny_sd_pipeline

    pickled = tmp_path / "pickled_model"
    tiny_sd_pipeline(seed=0).save_pretrained(str(pickled), safe_serialization=False)
    assert list((pickled / "unet").glob("*.bin")) and not list((pickled / "unet").glob("*.safetensors"))
    code, out = train(tmp_path, pickled, star_folder)
    err = capsys.readouterr().err
    assert code == 2 and "model_name: could not load" in err and "safetensors" in err
    assert not (out / "test_lora").exists()


def test_an_unreachable_hub_model_is_a_clear_error(tmp_path, star_folder, capsys):
    code, _ = train(tmp_path, "nobody/no-such-model", star_folder)
    err = capsys.readouterr().err
    assert code == 2 and "model_name: could not fetch model_index.json of 'nobody/no-such-model'" in err


def test_an_existing_adapter_is_replaced_only_by_a_complete_one(tmp_path):
    from diffusion_trainer.atomic import write_folder

    target = tmp_path / "my_lora"
    target.mkdir()
    (target / "pytorch_lora_weights.safetensors").write_text("old")

    def crash(directory):
        (directory / "pytorch_lora_weights.safetensors").write_text("half")
        raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError):
        write_folder(target, crash)
    assert (target / "pytorch_lora_weights.safetensors").read_text() == "old"
    write_folder(target, lambda d: (d / "pytorch_lora_weights.safetensors").write_text("new"))
    assert (target / "pytorch_lora_weights.safetensors").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["my_lora"]


def test_max_train_steps_beyond_the_epochs_adds_epochs_and_says_so(tmp_path, tiny_sd, star_folder, capsys):
    code, out = train(tmp_path, tiny_sd, star_folder, num_train_epochs=1, max_train_steps=6)  # 4 steps an epoch
    err = capsys.readouterr().err
    assert code == 0 and "max_train_steps=6 overrides num_train_epochs=1: training 2 epochs of 4 steps" in err
    info = json.loads((out / "test_lora" / "tlab_adaptor_info.json").read_text())
    assert info["steps_trained"] == 6 and info["epochs_trained"] == 2


def test_before_after_compares_the_image_before_training_with_the_last(tmp_path, tiny_sd, star_folder):
    from types import SimpleNamespace

    from PIL import Image

    from diffusion_trainer.lab import reporter as lab_reporter

    code, out = train(tmp_path, tiny_sd, star_folder, num_train_epochs=2, eval_prompt=PROMPT, eval_steps=1)
    assert code == 0
    eval_dir = out / "eval_images" / "test_lora"
    images = [eval_dir / name for name in ("before.png", "epoch_0001.png", "final.png")]
    assert all(p.is_file() for p in images)
    result = SimpleNamespace(eval_images=images, losses=[], paths=SimpleNamespace(logs_dir=tmp_path / "figures"))
    grid = Image.open(lab_reporter.artifacts(result)["before_after.png"]).convert("RGB")
    for column, expected in ((0, images[0]), (1, images[-1])):
        cell = grid.crop((column * 256, grid.height - 256, (column + 1) * 256, grid.height))
        assert list(cell.getdata()) == list(Image.open(expected).convert("RGB").resize((256, 256)).getdata())
    # a resumed run whose first run drew no before image shows no grid rather than a false one
    resumed = SimpleNamespace(eval_images=images[1:], losses=[], paths=result.paths)
    assert "before_after.png" not in lab_reporter.artifacts(resumed)


def test_a_stop_during_the_image_before_training_trains_no_step(tmp_path, tiny_sd, star_folder, monkeypatch, capsys):
    from conftest import stop_after_denoising_steps

    denoising_steps = stop_after_denoising_steps(monkeypatch, 2)
    code, out = train(tmp_path, tiny_sd, star_folder, eval_prompt=PROMPT, eval_num_inference_steps=50)
    assert code == 143, capsys.readouterr().err
    assert len(denoising_steps) == 2
    info = json.loads((out / "test_lora" / "tlab_adaptor_info.json").read_text())
    assert info["steps_trained"] == 0 and info["stopped_early"]
    assert not list((out / "eval_images" / "test_lora").glob("*.png"))
