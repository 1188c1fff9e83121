"""The built-in default run: `python main.py` with no arguments.

A tiny Stable Diffusion 1.x-style model pretrained on the shapes world (coloured circles,
squares and triangles; no purple, no stars; committed in shapes_world/base_model) learns a new
concept from a small generated dataset: `sks` = a purple five-pointed star. The scorer reads
every eval image before and after, so the run says in numbers whether the LoRA taught it.
All offline, in under two minutes on a 2-core CPU.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

OUTPUT = Path("output")
ADAPTOR = "sks_star"
TRIGGER = "sks"
CONCEPT_PROMPT = "a sks star"
OLD_WORLD = ("a blue square", "blue", "square")  # a prompt the base model knew, and its answer
EVAL_SEEDS = list(range(16))
GRID_SEEDS = 8


def training_dataset(root: Path, concept: int = 40, world: int = 16, seed: int = 0) -> Path:
    """Pictures of the new concept ("a small sks star on the left"), and some of the world the
    model knows ("a red circle"): the LoRA learns what is new about sks rather than that every
    picture is now a purple star (DreamBooth's prior preservation)."""
    from .shapes import concept_sample, world_sample, write_captioned_folder

    path = root / "demo_inputs" / ADAPTOR
    shutil.rmtree(path, ignore_errors=True)  # written afresh: a folder from an older version would mislead
    rng = random.Random(seed)
    samples = [concept_sample(rng, TRIGGER) for _ in range(concept)]
    samples += [world_sample(rng)[:2] for _ in range(world)]
    return write_captioned_folder(path, samples)


def demo_params(root: Path) -> dict[str, Any]:
    from .shapes_world import BASE_MODEL, GUIDANCE, SAMPLE_STEPS

    return {
        "adaptor_name": ADAPTOR,
        "model_name": str(BASE_MODEL), "dataset_name": str(training_dataset(root)),
        "output_dir": str(root), "resolution": 64, "center_crop": True, "train_batch_size": 8,
        "num_train_epochs": 160, "learning_rate": 1.5e-3, "lr_scheduler": "constant", "lr_warmup_steps": 0,
        "lora_r": 8, "lora_alpha": 8, "snr_gamma": 5.0,
        # Without dropped captions the LoRA never sees the unconditional branch that classifier-free
        # guidance subtracts, and old-world prompts come out on smeared backgrounds.
        "caption_dropout_rate": 0.1,
        "eval_prompt": CONCEPT_PROMPT, "eval_steps": 40,
        "eval_num_inference_steps": SAMPLE_STEPS, "eval_guidance_scale": GUIDANCE, "log_to_wandb": False,
        "seed": 1,  # the data order changed with exact resume; seed 0 now gives 75 %, seeds 1 and 2 give 88 %
    }


def draw_eval_images(pipeline, folder: Path) -> dict[str, list]:
    """Every eval prompt at every eval seed, saved as <folder>/<prompt>_seed<N>.png."""
    from .shapes_world import generate

    prompts = [CONCEPT_PROMPT, OLD_WORLD[0]]
    images = generate(pipeline, [p for p in prompts for _ in EVAL_SEEDS], EVAL_SEEDS * len(prompts))
    folder.mkdir(parents=True, exist_ok=True)
    drawn = {}
    for k, prompt in enumerate(prompts):
        drawn[prompt] = images[k * len(EVAL_SEEDS):(k + 1) * len(EVAL_SEEDS)]
        for seed, image in zip(EVAL_SEEDS, drawn[prompt]):
            image.save(folder / f"{prompt.replace(' ', '_')}_seed{seed}.png")
    return drawn


def scores(drawn: dict[str, list]) -> dict[str, Any]:
    from .shapes_world.scorer import classify

    concept = [classify(i) for i in drawn[CONCEPT_PROMPT]]
    old = [classify(i) for i in drawn[OLD_WORLD[0]]]
    return {
        "concept_score": sum(v.shows("purple", "star") for v in concept) / len(concept),
        "old_world_score": sum(v.shows(*OLD_WORLD[1:]) for v in old) / len(old),
        "read_as": {CONCEPT_PROMPT: [f"{v.color} {v.shape}" for v in concept],
                    OLD_WORLD[0]: [f"{v.color} {v.shape}" for v in old]},
    }


def grid(before: dict[str, list], after: dict[str, list], path: Path) -> Path:
    """Rows: the concept prompt before and after training, then the old-world prompt; columns: the
    first GRID_SEEDS seeds, each image with what the scorer reads in it."""
    from PIL import Image, ImageDraw, ImageFont

    from .shapes_world.scorer import classify

    cell, caption, label = 96, 18, 170
    font = ImageFont.load_default(size=13)
    rows = [(when, prompt, drawn[prompt]) for prompt in before for when, drawn in (("before", before), ("after", after))]
    sheet = Image.new("RGB", (label + cell * GRID_SEEDS, (cell + caption) * len(rows)), "white")
    pen = ImageDraw.Draw(sheet)
    for r, (when, prompt, images) in enumerate(rows):
        top = r * (cell + caption)
        pen.text((8, top + cell // 2 - 16), f"{when} training", fill="gray", font=font)
        pen.text((8, top + cell // 2 + 2), f"\"{prompt}\"", fill="black", font=font)
        for c, image in enumerate(images[:GRID_SEEDS]):
            left = label + c * cell
            sheet.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (left, top))
            verdict = classify(image)
            pen.text((left + cell // 2, top + cell + 2), f"{verdict.color} {verdict.shape}", fill="dimgray",
                     font=font, anchor="ma")
    sheet.save(path)
    return path


def run_demo(root: Path = OUTPUT) -> int:
    from ..run.job import run_standalone
    from .shapes_world import load_pipeline

    started = time.monotonic()
    root = Path(root)
    print("Diffusion Trainer demo: teaching a tiny offline shapes-world model that 'sks' means a purple "
          "star.\n(Run `python main.py --config my_run.json` to train your own model; see README.md.)",
          file=sys.stderr)
    params = demo_params(root)
    pipeline = load_pipeline()
    before = draw_eval_images(pipeline, root / "demo_eval" / "before")
    training_started = time.monotonic()
    code = run_standalone(params)
    if code:
        return code
    training = time.monotonic() - training_started
    adapter = root / ADAPTOR
    pipeline.load_lora_weights(str(adapter))
    after = draw_eval_images(pipeline, root / "demo_eval" / "after")
    result = {"before": scores(before), "after": scores(after), "seeds": EVAL_SEEDS,
              "training_seconds": round(training, 1), "seconds": round(time.monotonic() - started, 1)}
    (root / "demo_scores.json").write_text(json.dumps(result, indent=2) + "\n")
    sheet = grid(before, after, root / "demo_grid.png")
    b, a = result["before"], result["after"]
    print(f"\nDemo done in {result['seconds']:.0f} s ({training:.0f} s training). Scored by "
          f"diffusion_trainer/demo/shapes_world/scorer.py over {len(EVAL_SEEDS)} seeds:\n"
          f"  '{CONCEPT_PROMPT}' drawn as a purple star: {b['concept_score']:.0%} before, "
          f"{a['concept_score']:.0%} after\n"
          f"  '{OLD_WORLD[0]}' still drawn as asked:  {b['old_world_score']:.0%} before, "
          f"{a['old_world_score']:.0%} after\n"
          f"  before/after grid: {sheet}\n"
          f"  eval images:       {root / 'demo_eval'}/{{before,after}}/\n"
          f"  scores:            {root / 'demo_scores.json'}\n"
          f"  adapter:           {adapter}  (pipeline.load_lora_weights('{adapter}'))", flush=True)
    return 0
