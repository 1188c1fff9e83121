"""How close the trainer's step is to the floor, measured.

    python bench/benchmark.py                    # both models, table at the end
    python bench/benchmark.py --models tiny --rounds 6
    python bench/benchmark.py --scaling          # tiny model: 1 process vs 2 (torchrun, gloo on CPUs)
    python bench/benchmark.py --scaling --steps 200 --rounds 3

For each model (a tiny SD 1.x pipeline, and an SD 1.5-proportional one: SD 1.5's depths with every
width divided by 4), it builds the pipeline and a dataset offline, then runs, in alternation and
each in its own process: our trainer with its caches on, our trainer with them off, and a bare
floor loop on the same model and data. The floor only adds noise, runs the LoRA'd UNet forward and
backward and steps the optimizer, on latents and text embeddings already in memory. Each run
reports steady-state optimizer steps/s (after its first step), time from process start to the
first step done, and peak RSS. With --scaling it runs the tiny model's cached trainer in one
process and, by torchrun, in two (each with the same per-process batch, so twice the global
batch): global optimizer steps/s and images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = {  # resolution, batch size, measured steps
    "tiny": {"resolution": 64, "batch": 4, "steps": 600},
    "sd15": {"resolution": 256, "batch": 1, "steps": 40},
}


# --- models and data -----------------------------------------------------------------------------

def sd15_proportional_pipeline(seed: int = 0):
    """SD 1.5's architecture (UNet 4 levels x 2 layers, 8 heads; VAE 4 levels x 2 layers; CLIP
    12 layers) with every width divided by 4."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    from diffusion_trainer.demo.tiny_models import clip_text_encoder, clip_tokenizer, ddpm_scheduler

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(80, 160, 320, 320),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=192, attention_head_dim=8, norm_num_groups=16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 128, 128),
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        layers_per_block=2, norm_num_groups=16, sample_size=256)
    text_encoder = clip_text_encoder(tokenizer, hidden_size=192, layers=12, heads=12, projection_dim=192)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=ddpm_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build(name: str, workdir: Path) -> tuple[Path, Path]:
    from diffusion_trainer.demo import shapes
    from diffusion_trainer.demo.tiny_models import save_pipeline, tiny_sd_pipeline

    model = workdir / f"{name}_model"
    save_pipeline(tiny_sd_pipeline() if name == "tiny" else sd15_proportional_pipeline(), model)
    rng = random.Random(0)
    side = MODELS[name]["resolution"]
    data = shapes.write_captioned_folder(
        workdir / f"{name}_data", [(img.resize((side, side)), cap) for img, cap, *_ in (shapes.world_sample(rng) for _ in range(16))])
    return model, data


# --- the runs (each in its own process) -------------------------------------------------------------

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_trainer(model: str, data: str, name: str, cached: bool, out: str) -> dict:
    from diffusion_trainer.outputs.layout import RunPaths
    from diffusion_trainer.params import parse_params
    from diffusion_trainer.reporting import Reporter
    from diffusion_trainer.run.train import run_training

    spec = MODELS[name]
    params, _ = parse_params({
        "adaptor_name": "bench", "model_name": model, "dataset_name": data, "output_dir": out,
        "resolution": spec["resolution"], "center_crop": True, "train_batch_size": spec["batch"],
        "num_train_epochs": 1000, "max_train_steps": spec["steps"], "lr_warmup_steps": 0, "log_to_wandb": False,
        "cache_latents": cached, "cache_text_embeddings": cached, "seed": 0})
    result = run_training(params, RunPaths.under(params.output_dir, params.adaptor_name), Reporter())
    t = result.timing
    return {"steps_per_s": (result.steps - 1) / (t["end"] - t["first_step"]), "first_step": t["first_step"],
            "peak_rss_mb": peak_rss_mb()}


def run_floor(model: str, data: str, name: str) -> dict:
    """Noise, the LoRA'd UNet forward and backward, an optimizer step: nothing else."""
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig
    from PIL import Image
    from torchvision.transforms import functional as TF

    spec = MODELS[name]
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.to(device())
    unet, scheduler = pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=16, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    files = sorted(Path(data).glob("*.png"))
    with torch.no_grad():
        pixels = torch.stack([TF.normalize(TF.to_tensor(Image.open(f).convert("RGB")), [0.5], [0.5])
                              for f in files]).to(device())
        latents = pipe.vae.encode(pixels).latent_dist.sample() * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer([f.with_suffix(".txt").read_text().strip() for f in files], padding="max_length",
                             max_length=pipe.tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids
        text = pipe.text_encoder(ids.to(device()))[0]
    unet.train()
    first = None
    for step in range(spec["steps"]):
        rows = torch.randint(0, len(files), (spec["batch"],), device=device())
        x0, cond = latents[rows], text[rows]
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(rows),), device=device())
        pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=cond, return_dict=False)[0]
        torch.nn.functional.mse_loss(pred, noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            synchronize()
            first = time.monotonic()
    synchronize()
    end = time.monotonic()
    return {"steps_per_s": (spec["steps"] - 1) / (end - first), "first_step": first, "peak_rss_mb": peak_rss_mb()}


def child(args: argparse.Namespace) -> None:
    if args.child == "floor":
        result = run_floor(args.model_dir, args.data_dir, args.model)
    else:
        result = run_trainer(args.model_dir, args.data_dir, args.model, args.child == "cached", args.out)
    if os.environ.get("RANK", "0") == "0":
        print("RESULT " + json.dumps(result), flush=True)


def spawn(kind: str, name: str, model: Path, data: Path, workdir: Path, processes: int = 1,
          env: dict[str, str] | None = None) -> dict:
    started = time.monotonic()  # CLOCK_MONOTONIC is shared by all processes on Linux
    launcher = [sys.executable] if processes == 1 else [
        str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", str(processes)]
    proc = subprocess.run([*launcher, __file__, "--child", kind, "--model", name, "--model-dir", str(model),
                           "--data-dir", str(data), "--out", str(workdir / f"out_{kind}_{processes}"),
                           "--steps", str(MODELS[name]["steps"])],
                          capture_output=True, text=True, check=True, env=env)
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    result["to_first_step_s"] = result.pop("first_step") - started
    return result


def component_split(model: Path, name: str) -> dict[str, float]:
    """Time of one VAE encode, one text encode and one UNet forward+backward at the benchmark's
    batch and resolution: how an uncached step divides."""
    import torch
    from diffusers import StableDiffusionPipeline

    spec = MODELS[name]
    pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device())
    b, r = spec["batch"], spec["resolution"]
    pixels = torch.randn(b, 3, r, r, device=device())
    ids = pipe.tokenizer(["a red circle"] * b, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids.to(device())
    latents = torch.randn(b, 4, r // 8, r // 8, device=device())
    cond = pipe.text_encoder(ids)[0].detach()

    def unet_step():
        timesteps = torch.full((b,), 500, device=device())
        pipe.unet(latents, timesteps, encoder_hidden_states=cond).sample.mean().backward()

    parts = {"vae_encode": lambda: pipe.vae.encode(pixels), "text_encode": lambda: pipe.text_encoder(ids),
             "unet_fwd_bwd": unet_step}
    times = {}
    for part, fn in parts.items():
        with torch.set_grad_enabled(part == "unet_fwd_bwd"):
            fn()
            synchronize()
            start = time.perf_counter()
            for _ in range(3):
                fn()
            synchronize()
            times[part] = (time.perf_counter() - start) / 3
    total = sum(times.values())
    return {k: v / total for k, v in times.items()}


def scaling(rounds: int) -> None:
    """The tiny model's cached trainer on one process and on two (torchrun), in alternation."""
    import torch

    spec = MODELS["tiny"]
    runs: dict[int, list[dict]] = {1: [], 2: []}
    # One thread per process in both (torchrun's default): on a shared machine, a process of two
    # spinning OpenMP threads slows down many-fold when the cores are busy.
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model, data = build("tiny", workdir)
        for _ in range(rounds):
            for processes in runs:
                runs[processes].append(spawn("cached", "tiny", model, data, workdir, processes, one_thread))
                print(f"  tiny cached x{processes}: {runs[processes][-1]}", flush=True)
    print(f"\ntorch {torch.__version__}, {os.cpu_count()} CPUs, CUDA {torch.cuda.is_available()}; tiny: "
          f"{spec['resolution']} px, batch {spec['batch']} per process, {spec['steps']} optimizer steps; median "
          f"of {rounds} rounds, one thread per process (OMP_NUM_THREADS=1)\n")
    print("| processes | global batch | steps/s | images/s | vs one process (images/s, range) | to first step (s) |")
    print("|---|---|---|---|---|---|")
    for processes, results in runs.items():
        images = [r["steps_per_s"] * spec["batch"] * processes for r in results]
        ratios = [i / (one["steps_per_s"] * spec["batch"]) for i, one in zip(images, runs[1])]
        print(f"| {processes} | {spec['batch'] * processes} | {statistics.median(r['steps_per_s'] for r in results):.2f} "
              f"| {statistics.median(images):.1f} | {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) "
              f"| {statistics.median(r['to_first_step_s'] for r in results):.1f} |")


def checkpoint_cost(model: Path, data: Path, name: str, workdir: Path) -> dict[str, float]:
    """Seconds one checkpoint save takes against one optimizer step (a cached run of 20 steps with EMA,
    a checkpoint every 5), and what share of training time the default checkpointing_steps costs."""
    from diffusion_trainer.outputs.layout import RunPaths
    from diffusion_trainer.params import TrainingParams, parse_params
    from diffusion_trainer.reporting import Reporter
    from diffusion_trainer.run import checkpoint
    from diffusion_trainer.run.train import run_training

    spec, saves = MODELS[name], []
    real_save = checkpoint.Checkpoints.save

    def timed_save(self, *args):
        start = time.monotonic()
        result = real_save(self, *args)
        saves.append(time.monotonic() - start)
        return result

    checkpoint.Checkpoints.save = timed_save
    params, _ = parse_params({
        "adaptor_name": "bench_ckpt", "model_name": str(model), "dataset_name": str(data),
        "output_dir": str(workdir / "out_ckpt"), "resolution": spec["resolution"], "center_crop": True,
        "train_batch_size": spec["batch"], "num_train_epochs": 1000, "max_train_steps": 20,
        "lr_warmup_steps": 0, "log_to_wandb": False, "checkpointing_steps": 5, "use_ema": True, "seed": 0})
    result = run_training(params, RunPaths.under(params.output_dir, params.adaptor_name), Reporter())
    checkpoint.Checkpoints.save = real_save
    t = result.timing
    step_s = (t["end"] - t["first_step"] - sum(saves)) / (result.steps - 1)
    save_s = statistics.median(saves)
    default = TrainingParams.model_fields["checkpointing_steps"].default
    return {"save_s": save_s, "step_s": step_s, "saves": len(saves),
            "share_at_default": save_s / (save_s + default * step_s), "default": default}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,sd15")
    parser.add_argument("--rounds", type=int, default=4, help="alternations of trainer / floor per model")
    parser.add_argument("--scaling", action="store_true", help="one process vs two on the tiny model")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: each model's own)")
    parser.add_argument("--checkpoint-cost", action="store_true",
                        help="only measure one checkpoint save against one step, per model")
    parser.add_argument("--child", choices=["cached", "uncached", "floor"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from diffusion_trainer.reporting import quiet_libraries

    quiet_libraries()
    for spec in MODELS.values():
        spec["steps"] = args.steps or spec["steps"]
    if args.child:
        return child(args)
    if args.scaling:
        return scaling(args.rounds)
    import torch

    if args.checkpoint_cost:
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.models.split(","):
                model, data = build(name, Path(tmp))
                cost = checkpoint_cost(model, data, name, Path(tmp))
                print(f"{name}: one checkpoint save {cost['save_s']:.3f} s (median of {cost['saves']}), one step "
                      f"{cost['step_s']:.3f} s; checkpointing_steps={cost['default']} costs "
                      f"{cost['share_at_default']:.2%} of training time", flush=True)
        return None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name in args.models.split(","):
            model, data = build(name, workdir)
            split = component_split(model, name)
            print(f"{name}: uncached step split " + ", ".join(f"{k} {v:.0%}" for k, v in split.items()), flush=True)
            runs: dict[str, list[dict]] = {"floor": [], "cached": [], "uncached": []}
            for _ in range(args.rounds):
                for kind in ("cached", "floor", "uncached"):
                    runs[kind].append(spawn(kind, name, model, data, workdir))
                    print(f"  {name} {kind}: {runs[kind][-1]}", flush=True)
            for kind, results in runs.items():
                # Each run is compared with the floor run of its own round, next to it in time:
                # the machine's drift between rounds cancels.
                ratios = [r["steps_per_s"] / f["steps_per_s"] for r, f in zip(results, runs["floor"])]
                rows.append((name, kind, statistics.median(r["steps_per_s"] for r in results),
                             statistics.median(ratios), min(ratios), max(ratios),
                             statistics.median(r["to_first_step_s"] for r in results),
                             max(r["peak_rss_mb"] for r in results)))
    spec = ", ".join(f"{n}: {MODELS[n]['resolution']} px, batch {MODELS[n]['batch']}, {MODELS[n]['steps']} steps"
                     for n in args.models.split(","))
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, CUDA {torch.cuda.is_available()}; {spec}; "
          f"median of {args.rounds} rounds, each running cached, floor and uncached one after another\n")
    print("| model | run | steps/s | ratio to floor (range over rounds) | to first step (s) | peak RSS (MB) |")
    print("|---|---|---|---|---|---|")
    for name, kind, speed, ratio, low, high, first, rss in rows:
        print(f"| {name} | {kind} | {speed:.2f} | {ratio:.3f} ({low:.3f}-{high:.3f}) | {first:.1f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
