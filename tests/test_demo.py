"""`python main.py` with no arguments: the built-in default run teaches `sks` = a purple star.

The run happens once per session; each test checks one thing a user sees. The scores are
recomputed here from the PNGs the run wrote, with the shapes-world scorer.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from diffusion_trainer.demo.shapes_world.scorer import classify
from diffusion_trainer.demo.star_demo import CONCEPT_PROMPT, EVAL_SEEDS, OLD_WORLD, run_demo


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "output"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = run_demo(root)
    return root, code, printed.getvalue()


def share(folder: Path, prompt: str, color: str, shape: str) -> float:
    images = [Image.open(folder / f"{prompt.replace(' ', '_')}_seed{s}.png") for s in EVAL_SEEDS]
    return sum(classify(i).shows(color, shape) for i in images) / len(images)


def test_the_default_run_succeeds_and_says_where_everything_is(demo):
    root, code, out = demo
    assert code == 0
    adapter = root / "sks_star"
    assert (adapter / "pytorch_lora_weights.safetensors").is_file()
    for shown in (adapter, root / "demo_grid.png", root / "demo_eval", root / "logs" / "sks_star"):
        assert str(shown) in out
    assert "before" in out and "after" in out and "Demo done in" in out
    assert list((root / "logs" / "sks_star").rglob("events.out.tfevents.*"))
    assert (root / "eval_images" / "sks_star" / "final.png").is_file()


def test_before_training_the_base_model_does_not_draw_the_concept(demo):
    root, _, _ = demo
    assert len(EVAL_SEEDS) >= 8
    assert share(root / "demo_eval" / "before", CONCEPT_PROMPT, "purple", "star") < 0.2


def test_after_training_sks_star_is_a_purple_star(demo):
    root, _, _ = demo
    assert share(root / "demo_eval" / "after", CONCEPT_PROMPT, "purple", "star") > 0.8


def test_the_lora_leaves_the_old_world_alone(demo):
    root, _, _ = demo
    prompt, color, shape = OLD_WORLD
    before = share(root / "demo_eval" / "before", prompt, color, shape)
    after = share(root / "demo_eval" / "after", prompt, color, shape)
    assert before >= 0.75 and after >= 0.75, (before, after)


def test_the_printed_and_saved_scores_match_the_images(demo):
    root, _, out = demo
    saved = json.loads((root / "demo_scores.json").read_text())
    after = share(root / "demo_eval" / "after", CONCEPT_PROMPT, "purple", "star")
    assert saved["after"]["concept_score"] == after
    assert f"{after:.0%} after" in out


def test_the_grid_shows_every_prompt_before_and_after(demo):
    root, _, _ = demo
    grid = Image.open(root / "demo_grid.png")
    assert grid.height >= 4 * 96 and grid.width > 8 * 96


def test_the_demo_dataset_is_written_afresh_over_an_older_one(tmp_path):
    from diffusion_trainer.demo.star_demo import training_dataset

    stale = tmp_path / "demo_inputs" / "sks_star"
    stale.mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(stale / "9999.png")
    (stale / "9999.txt").write_text("a leftover from an older demo")
    folder = training_dataset(tmp_path)
    captions = [p.read_text() for p in sorted(folder.glob("*.txt"))]
    assert len(list(folder.glob("*.png"))) == len(captions) == 56
    assert sum("sks star" in c for c in captions) == 40 and "a leftover from an older demo" not in captions
