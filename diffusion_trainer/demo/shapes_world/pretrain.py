"""Pretrain the shapes-world base model: a tiny Stable Diffusion 1.x-style pipeline.

    python -m diffusion_trainer.demo.shapes_world.pretrain --seed 0 --out diffusion_trainer/demo/shapes_world/base_model

1. The VAE learns to reconstruct any shape in any colour (stars and purple included: a codec
   must draw whatever a LoRA later teaches). Plain L1 + L2 reconstruction, a small KL term.
2. Frozen, it encodes a captioned world dataset once (circles, squares, triangles in red, green,
   blue, yellow; no purple, no stars). The text encoder and UNet then learn it jointly with the
   standard epsilon DDPM objective, 10% empty captions for classifier-free guidance, Min-SNR-5
   weights, and an EMA of the weights, which is what is saved.
3. The saved pipeline is scored: the share of prompts "a <colour> <shape>" whose images the
   scorer reads as that colour and shape. Figures and the command go to NOTE.md beside it.

Deterministic: fixed seeds, torch.use_deterministic_algorithms, a fixed thread count.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import shapes
from ..tiny_models import DEFAULT_WORDS, clip_text_encoder, clip_tokenizer, ddpm_scheduler, tiny_vae
from . import BASE_MODEL, GUIDANCE, SAMPLE_STEPS, generate, scorer

THREADS = 2
MAX_TOKENS = 16  # the longest caption is 9 tokens with its start and end tokens
VAE_BLOCKS = (16, 16, 32, 32)  # scale factor 8: 64x64 pixels, 8x8x4 latents


def build(seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(DEFAULT_WORDS, model_max_length=MAX_TOKENS)
    text_encoder = clip_text_encoder(tokenizer, hidden_size=64, layers=2, heads=4, projection_dim=64)
    vae = tiny_vae(block_out_channels=VAE_BLOCKS)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16)
    return tokenizer, text_encoder, vae, unet


def pixels(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2).float() / 127.5 - 1


def cosine_lr(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup))))


def train_vae(vae, images: torch.Tensor, steps: int, seed: int, log) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    vae.train()
    for step in range(steps):
        x = images[torch.randint(0, len(images), (32,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=generator)
        y = vae.decode(z).sample
        reconstruction = (y - x).abs().mean() + (y - x).square().mean()
        loss = reconstruction + 1e-4 * posterior.kl().mean() / z[0].numel()
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, 2e-3)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"vae step {step}: reconstruction {reconstruction.item():.4f}")
    vae.eval()


@torch.no_grad()
def encode(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    posteriors = [vae.encode(chunk).latent_dist for chunk in images.split(256)]
    return torch.cat([p.mean for p in posteriors]), torch.cat([p.std for p in posteriors])


def token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def caption_ids(tokenizer, world: list) -> torch.Tensor:
    """Token ids of each world picture's caption four ways: in full, without its colour word,
    with "shape" for its shape word, and empty. Captions vary in detail, as real ones do, so the
    model learns that what a prompt leaves out can be anything."""
    variants = [[caption for _, caption, _, _ in world],
                [caption.replace(f"{color} ", "") for _, caption, color, _ in world],
                [caption.replace(shape, "shape") for _, caption, _, shape in world],
                [""] * len(world)]
    return torch.stack([token_ids(tokenizer, captions) for captions in variants])


def train_denoiser(unet, text_encoder, ids: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                   scaling: float, steps: int, batch: int, seed: int, log):
    """Text encoder and UNet together, epsilon objective; returns their EMA copies.

    ids: caption_ids(); 70% of samples are trained with the full caption, 10% each without
    colour, without shape, and with none (for classifier-free guidance)."""
    from diffusers.training_utils import compute_snr

    scheduler = ddpm_scheduler()
    generator = torch.Generator().manual_seed(seed)
    modules = torch.nn.ModuleList([unet, text_encoder]).train()
    averaged = copy.deepcopy(modules).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=1e-3, weight_decay=0.0)
    for step in range(steps):
        idx = torch.randint(0, ids.shape[1], (batch,), generator=generator)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator)) * scaling
        variant = (3 - (torch.rand(batch, generator=generator) * 10).long()).clamp(min=0)  # 0 at 70%
        tokens = ids[variant, idx]
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=text_encoder(tokens)[0]).sample
        snr = compute_snr(scheduler, timesteps)
        weights = torch.clamp(snr, max=5.0) / snr
        loss = ((prediction - noise).square().mean(dim=(1, 2, 3)) * weights).mean()
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, 1e-3)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        optimizer.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in zip(averaged.parameters(), modules.parameters()):
                ema.lerp_(live, 1 - decay)
        if step % 250 == 0 or step == steps - 1:
            log(f"denoiser step {step}: loss {loss.item():.4f}")
    return averaged[0], averaged[1]


def assemble(vae, text_encoder, tokenizer, unet):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    scheduler = DPMSolverMultistepScheduler.from_config(ddpm_scheduler().config)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def prompt_following(pipeline, seeds_per_prompt: int = 4, first_seed: int = 1000):
    """The share of images for "a <colour> <shape>" that the scorer reads as asked, by prompt."""
    asked = [(c, s) for c in shapes.COLORS for s in shapes.SHAPES]
    prompts = [f"a {c} {s}" for c, s in asked for _ in range(seeds_per_prompt)]
    seeds = [first_seed + i for i in range(len(prompts))]
    verdicts = [scorer.classify(i) for i in generate(pipeline, prompts, seeds)]
    hits = [v.shows(*pair) for v, pair in zip(verdicts, (p for p in asked for _ in range(seeds_per_prompt)))]
    by_prompt = {f"a {c} {s}": sum(hits[k * seeds_per_prompt:(k + 1) * seeds_per_prompt]) / seeds_per_prompt
                 for k, (c, s) in enumerate(asked)}
    return sum(hits) / len(hits), by_prompt


def scorer_accuracy(vae, seed: int, count: int = 1000) -> dict[str, float]:
    """The scorer on held-out pictures straight from the generator, and after a VAE round trip."""
    scores = {}
    for name, (images, answers) in scorer.held_out_pictures(seed, count).items():
        scores[name] = scorer.accuracy(images, answers)
        scores[f"{name}_vae"] = scorer.accuracy(round_trip(vae, images), answers)
    return scores


@torch.no_grad()
def round_trip(vae, images) -> list:
    from PIL import Image

    decoded = torch.cat([vae.decode(m).sample for m in encode(vae, pixels(images))[0].split(256)])
    as_bytes = ((decoded.permute(0, 2, 3, 1) + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).numpy()
    return [Image.fromarray(a) for a in as_bytes]


def file_digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            for p in sorted(folder.rglob("*.safetensors"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=BASE_MODEL)
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--world", type=int, default=6000, help="captioned world pictures")
    args = parser.parse_args(argv)

    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.0f} s] {message}", flush=True)

    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    from ...reporting import quiet_libraries
    from ..tiny_models import save_pipeline

    quiet_libraries()
    tokenizer, text_encoder, vae, unet = build(args.seed)
    rng = random.Random(args.seed)
    codec = pixels([shapes.codec_sample(rng) for _ in range(6000)])
    log(f"{len(codec)} VAE training pictures")
    train_vae(vae, codec, args.vae_steps, args.seed, log)

    world = [shapes.world_sample(rng) for _ in range(args.world)]
    mean, std = encode(vae, pixels([w[0] for w in world]))
    scaling = round(1.0 / float(mean.std()), 4)
    vae.register_to_config(scaling_factor=scaling)
    log(f"{len(world)} world pictures encoded; latent scaling factor {scaling}")
    unet, text_encoder = train_denoiser(unet, text_encoder, caption_ids(tokenizer, world), mean, std, scaling,
                                        args.steps, args.batch, args.seed, log)

    pipeline = assemble(vae, text_encoder, tokenizer, unet)
    save_pipeline(pipeline, args.out)
    trained = time.monotonic() - started
    log(f"saved to {args.out}")
    accuracy, by_prompt = prompt_following(pipeline)
    scores = scorer_accuracy(vae, args.seed + 1)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    log(f"prompt following {accuracy:.3f}; scorer {scores}")
    changed = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                       if k not in {"seed", "out"} and v != parser.get_default(k))
    write_note(args, changed, trained, accuracy, by_prompt, scores, size, time.monotonic() - started)
    return 0


def write_note(args, changed: str, trained: float, accuracy: float, by_prompt: dict, scores: dict, size: int,
               total: float) -> None:
    out = "" if args.out.resolve() == BASE_MODEL else f" --out {args.out}"
    command = f"python -m diffusion_trainer.demo.shapes_world.pretrain --seed {args.seed}{out} {changed}"
    lines = [
        "# Shapes-world base model", "",
        "A tiny Stable Diffusion 1.x-style pipeline (VAE, UNet, CLIP tokenizer and text encoder, "
        "DPM-Solver scheduler) trained on the shapes world by `pretrain.py`:", "",
        f"    {command.rstrip()}", "",
        f"- seed {args.seed}, {THREADS} torch threads, torch {torch.__version__}; "
        f"training took {trained:.0f} s, {total:.0f} s with the measurements below "
        f"({sys.platform}, {torch.get_num_threads()} threads)",
        f"- {size / 1e6:.2f} MB on disk",
        f"- prompt following (\"a <colour> <shape>\", 4 seeds each, {SAMPLE_STEPS} steps, guidance "
        f"{GUIDANCE}): {accuracy:.3f}",
        "  " + ", ".join(f"{p}: {a:.2f}" for p, a in by_prompt.items()),
        f"- scorer on 1000 held-out world pictures: {scores['world']:.3f}; after a VAE round trip: "
        f"{scores['world_vae']:.3f}; on 250 purple stars: {scores['concept']:.3f}, after a round trip: "
        f"{scores['concept_vae']:.3f}",
        "- weight digests (sha256, first 16 hex): " + ", ".join(f"{k} {v}" for k, v in file_digests(args.out).items()),
    ]
    (args.out / "NOTE.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
