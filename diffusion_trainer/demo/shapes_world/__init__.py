"""The shapes world's base model, its scorer, and how both are sampled.

`base_model/` is a tiny Stable Diffusion 1.x-style pipeline trained on the shapes world by
`pretrain.py` (see base_model/NOTE.md); `scorer.py` reads the colour and shape of a picture.
"""

from __future__ import annotations

from pathlib import Path

BASE_MODEL = Path(__file__).resolve().parent / "base_model"
SAMPLE_STEPS, GUIDANCE = 20, 5.0  # how every picture in the demo and the tests is sampled


def load_pipeline(path: Path = BASE_MODEL):
    from diffusers import StableDiffusionPipeline

    if not (Path(path) / "model_index.json").is_file():
        raise FileNotFoundError(f"no pipeline at {path}; make it with "
                                "`python -m diffusion_trainer.demo.shapes_world.pretrain --seed 0`")
    pipeline = StableDiffusionPipeline.from_pretrained(str(path), use_safetensors=True, safety_checker=None,
                                                       requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate(pipeline, prompts: list[str], seeds: list[int], steps: int = SAMPLE_STEPS,
             guidance: float = GUIDANCE, batch: int = 64) -> list:
    """One 64x64 image per (prompt, seed) pair, in batches."""
    import torch

    images = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch):
            chunk = slice(start, start + batch)
            generators = [torch.Generator().manual_seed(s) for s in seeds[chunk]]
            images += pipeline(prompt=prompts[chunk], generator=generators, num_inference_steps=steps,
                               guidance_scale=guidance, height=64, width=64).images
    return images
