"""The small rules a user meets at the edges (issue 17, item 7): each odd input gets a clear message
naming what is wrong, or follows a rule the README states."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import quick_params, run_main

from diffusion_trainer.params import parse_params


def config_text(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.json"
    path.write_text(text)
    return path


# --- parameters ----------------------------------------------------------------------------------

def test_json_true_is_not_a_number_and_infinity_or_nan_are_not_finite(tmp_path, capsys):
    base = json.dumps(quick_params(tmp_path / "model", tmp_path / "data", tmp_path / "out"))[:-1]
    config = config_text(tmp_path, base + ', "seed": true, "learning_rate": NaN, "max_grad_norm": Infinity, '
                         '"adam_epsilon": -Infinity, "train_batch_size": false}')
    assert run_main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "seed: must be a number, not true" in err
    assert "train_batch_size: must be a number, not false" in err
    for name in ("learning_rate", "max_grad_norm", "adam_epsilon"):
        assert f"{name}: must be a finite number" in err
    assert "must be less than or equal" not in err
    assert not (tmp_path / "out").exists()


def test_a_nan_typed_in_a_form_is_not_finite_either(tmp_path, capsys):
    config = config_text(tmp_path, json.dumps(quick_params(tmp_path / "m", tmp_path / "d", tmp_path / "o",
                                                           learning_rate="nan", huber_c=" inf ")))
    assert run_main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "learning_rate: must be a finite number" in err and "huber_c: must be a finite number" in err


def test_an_empty_output_dir_from_a_form_means_the_default_output_folder():
    raw = {"adaptor_name": "a", "model_name": "m", "dataset_name": "d"}
    assert parse_params({**raw, "output_dir": ""})[0].output_dir == "./output"
    assert parse_params({**raw, "output_dir": "  "})[0].output_dir == "./output"
    assert parse_params({**raw, "output_dir": "runs"})[0].output_dir == "runs"


# --- the command line ----------------------------------------------------------------------------

def test_an_unknown_command_line_option_is_an_error_not_a_demo_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_main(["--cofnig", "run.json"]) == 2
    err = capsys.readouterr().err
    assert "unknown argument(s) --cofnig run.json" in err and "did you mean --config?" in err
    assert list(tmp_path.iterdir()) == []  # no demo ran
