"""The optimizer parameter: each choice trains the tiny model where this machine can run it, and
the ones it cannot are refused before any weights are loaded."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import train
from safetensors.torch import load_file

from diffusion_trainer.run import optimizers


def optimizer_classes(monkeypatch) -> list[str]:
    """Record the class of every optimizer that takes a step."""
    used = []
    make = optimizers.make_optimizer

    def recording(*args, **kwargs):
        optimizer = make(*args, **kwargs)
        used.append(type(optimizer).__name__)
        return optimizer

    monkeypatch.setattr(optimizers, "make_optimizer", recording)
    return used


@pytest.mark.parametrize("name, cls", [("adamw", "AdamW"), ("adafactor", "Adafactor"), ("prodigy", "Prodigy")])
def test_each_optimizer_trains_the_lora(tmp_path, tiny_sd, star_folder, monkeypatch, capsys, name, cls):
    if name == "prodigy" and importlib.util.find_spec("prodigyopt") is None:
        pytest.skip("prodigyopt (in requirements.txt) is not installed in this environment")
    used = optimizer_classes(monkeypatch)
    learning_rate = 1.0 if name == "prodigy" else 1e-3
    code, out = train(tmp_path, tiny_sd, star_folder, max_train_steps=3, optimizer=name, learning_rate=learning_rate)
    assert code == 0 and used == [cls]
    weights = load_file(out / "test_lora" / "pytorch_lora_weights.safetensors")
    ups = [w for k, w in weights.items() if "lora.up" in k or "lora_B" in k]
    assert ups and any(w.abs().sum() > 0 for w in ups)  # B starts at zero: it moved
    assert "learning_rate" not in capsys.readouterr().err  # prodigy at 1.0: no warning


def test_prodigy_warns_when_the_learning_rate_is_not_one(tmp_path, tiny_sd, star_folder, capsys):
    if importlib.util.find_spec("prodigyopt") is None:
        pytest.skip("prodigyopt (in requirements.txt) is not installed in this environment")
    code, _ = train(tmp_path, tiny_sd, star_folder, max_train_steps=1, optimizer="prodigy", learning_rate=1e-4)
    assert code == 0
    assert "optimizer=prodigy finds its own step size; learning_rate=0.0001 multiplies it" in capsys.readouterr().err


def test_adamw8bit_trains_with_8_bit_optimizer_states(tmp_path, tiny_sd, star_folder, monkeypatch):
    import bitsandbytes as bnb

    from diffusion_trainer.run import setup

    made = []
    real = setup.optimizers.make_optimizer
    monkeypatch.setattr(setup.optimizers, "make_optimizer", lambda *a: made.append(real(*a)) or made[-1])
    code, out = train(tmp_path, tiny_sd, star_folder, optimizer="adamw8bit", max_train_steps=2,
                      lora_r=64, lora_alpha=64)  # bitsandbytes keeps tensors under 4096 values in 32 bits
    assert code == 0 and (out / "test_lora" / "pytorch_lora_weights.safetensors").is_file()
    assert isinstance(made[0], bnb.optim.AdamW8bit)
    states = [s for s in made[0].state.values() if "state1" in s]
    assert torch.uint8 in {s["state1"].dtype for s in states}  # blockwise 8-bit moments


def test_adamw8bit_without_bitsandbytes_names_the_package(monkeypatch):
    from diffusion_trainer.errors import InputError
    from diffusion_trainer.params import parse_params

    params = parse_params({"adaptor_name": "a", "model_name": "m/m", "dataset_name": "d", "optimizer": "adamw8bit"})[0]
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(InputError, match=r"optimizer: adamw8bit needs the bitsandbytes package.*pip install bitsandbytes"):
        optimizers.check_optimizer(params, reporter=None)
