"""Every real-size model of tests/real_configs: the memory plan's predicted train-step peak against
the fake-tensor simulation of this trainer's own step (bf16, with and without gradient
checkpointing; rank 16, batch 1), the plan's figures for the storage modes the simulation does not
run, and what `auto` chooses for 24, 16 and 8 GB. Takes a few minutes on a CPU; no GPU needed.

    python bench/memory_simulation.py [--models flux1_dev,sdxl] [--no-simulation]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusion_trainer.families import family_for  # noqa: E402
from diffusion_trainer.memory.plan import Planner, Run, Settings, make_plan  # noqa: E402
from diffusion_trainer.memory.simulate import simulate_run  # noqa: E402

MODELS = {"flux1_dev": ("FLUX.1-dev", 1024), "sd35_large": ("SD3.5 Large", 1024),
          "sd35_medium": ("SD3.5 Medium", 1024), "sdxl": ("SDXL", 1024), "sd15": ("SD 1.5", 512),
          # issue 22's families (512 caption tokens: the most a caption can have)
          "flux2_dev": ("FLUX.2-dev", 1024), "flux2_klein_4b": ("FLUX.2-klein-base-4B", 1024),
          "chroma1_hd": ("Chroma1-HD", 1024), "z_image_turbo": ("Z-Image-Turbo", 1024),
          "qwen_image": ("Qwen-Image", 1024)}


def train_peak(planner: Planner, settings: Settings) -> float:
    return next(s for s in planner.plan(settings, None).stages if s.name == "train step").peak_gb


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--no-simulation", action="store_true")
    args = parser.parse_args()
    print("| model | bf16: plan / simulated | bf16 + GC: plan / simulated | fp8 + GC | int8 + GC | nf4 + GC "
          "| bf16 + GC + offload | auto at 24 / 16 / 8 GB |")
    print("|---|---|---|---|---|---|---|---|")
    for key in args.models.split(","):
        label, resolution = MODELS[key]
        source = str(ROOT / "tests" / "real_configs" / key)
        family = family_for(source)
        run = Run(resolution, 1, 16, "default", "bf16", eval_images=True)
        planner = Planner(family, source, run)
        cells = []
        for gc in (False, True):
            predicted = train_peak(planner, Settings("bf16", gc, "none"))
            if args.no_simulation:
                cells.append(f"{predicted:.1f} / —")
                continue
            started = time.monotonic()
            simulated = simulate_run(source, resolution=resolution, batch_size=1, rank=16, lora_layers="default",
                                     checkpointing=gc).peak_gb
            cells.append(f"{predicted:.1f} / {simulated:.1f} ({100 * (predicted / simulated - 1):+.0f} %)")
            print(f"  [{label} gc={gc}: simulated in {time.monotonic() - started:.0f} s]", file=sys.stderr)
        cells += [f"{train_peak(planner, Settings(s, True, 'none')):.1f}" for s in ("fp8", "int8", "nf4")]
        cells.append(f"{train_peak(planner, Settings('bf16', True, 'blocks')):.1f}")
        chosen = []
        for budget in (24, 16, 8):
            try:
                plan = make_plan(family, source, run, base_precision="auto", offload="auto",
                                 gradient_checkpointing=False, budget_gb=budget)
                s = plan.settings
                chosen.append(f"{s.base_precision}{' GC' if s.gradient_checkpointing else ''}"
                              f"{' offload' if s.offload == 'blocks' else ''} ({plan.peak_gb:.1f})")
            except Exception:
                chosen.append("does not fit")
        print(f"| {label} {resolution} px | " + " | ".join(cells) + " | " + " / ".join(chosen) + " |", flush=True)


if __name__ == "__main__":
    main()
