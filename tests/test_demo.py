"""`python main.py` with no arguments: the built-in default run."""

from __future__ import annotations

from diffusion_trainer.demo import run_demo


def test_the_default_run_trains_and_says_where_everything_is(tmp_path, capsys):
    assert run_demo(tmp_path) == 0
    out = capsys.readouterr().out
    adapter = tmp_path / "sks_star"
    assert (adapter / "pytorch_lora_weights.safetensors").is_file()
    assert str(adapter) in out and "eval images:" in out and "logs:" in out
    assert list((tmp_path / "eval_images" / "sks_star").glob("*.png"))
    assert list((tmp_path / "logs" / "sks_star").rglob("events.out.tfevents.*"))
