"""Every real-size model of tests/real_configs: the memory plan's predicted train-step peak against
the fake-tensor simulation of this trainer's own step (rank 16, batch 1, bf16 compute) for each
storage of the frozen base (bf16, fp8, int8, nf4, with and without gradient checkpointing) and
block offload, then issue 19's goal table: what `auto` chooses for 24, 16 and 8 GB (4 GB for SD 1.5),
its predicted peak and the simulated peak of that choice. About 7 minutes on a 2-core CPU; no GPU needed.

    python bench/memory_simulation.py [--models flux1_dev,sdxl] [--modes bf16,int8+gc] [--no-simulation]
                                      [--cache simulated.json]

A mode is a storage, `+gc` for gradient checkpointing, `+offload` for this trainer's block offload
(memory/offload.py), `+offload-diffusers` for diffusers' group offload with streams, simulated to
show why the trainer does not use it (the plan's figure is that of `+offload`). `--cache` keeps
the simulated peaks in a JSON file and reuses them, so that the plan can be compared again without simulating again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusion_trainer.families import family_for  # noqa: E402
from diffusion_trainer.memory.plan import DoesNotFit, Planner, Run, Settings, make_plan  # noqa: E402
from diffusion_trainer.memory.simulate import simulate_run  # noqa: E402
from diffusion_trainer.memory.storage_sim import missing_library  # noqa: E402

MODELS = {"flux1_dev": ("FLUX.1-dev", 1024), "sd35_large": ("SD3.5 Large", 1024),
          "sd35_medium": ("SD3.5 Medium", 1024), "sdxl": ("SDXL", 1024), "sd15": ("SD 1.5", 512),
          # issue 22's families (512 caption tokens: the most a caption can have)
          "flux2_dev": ("FLUX.2-dev", 1024), "flux2_klein_4b": ("FLUX.2-klein-base-4B", 1024),
          "chroma1_hd": ("Chroma1-HD", 1024), "z_image_turbo": ("Z-Image-Turbo", 1024),
          "qwen_image": ("Qwen-Image", 1024)}
# The models of issue 19, simulated in every mode by default (the others with --models).
ISSUE_19 = ("flux1_dev", "sd35_large", "sd35_medium", "sdxl", "sd15")
MODES = "bf16,bf16+gc,fp8,fp8+gc,int8,int8+gc,nf4,nf4+gc,bf16+gc+offload,bf16+gc+offload-diffusers"
BUDGETS = {"sd15": (24, 16, 8, 4)}
# Not simulated with offload: a UNet's checkpointing recomputes resnets and attention blocks, not the
# blocks offload streams, so the hooks this accounting follows do not run in its backward.
UNETS = {"sd15", "sdxl"}


def settings_of(mode: str) -> Settings:
    storage, *flags = mode.split("+")
    return Settings(storage, "gc" in flags, "blocks" if any(f.startswith("offload") for f in flags) else "none")


def mode_of(settings: Settings) -> str:
    return (settings.base_precision + ("+gc" if settings.gradient_checkpointing else "")
            + ("+offload" if settings.offload == "blocks" else ""))


def train_peak(planner: Planner, settings: Settings) -> float:
    return next(s for s in planner.plan(settings, None).stages if s.name == "train step").peak_gb


class Simulations:
    """Each (model, mode) simulated once, and kept in `cache` (a JSON file) when given."""

    def __init__(self, enabled: bool, cache: str | None):
        self.enabled, self.cache = enabled, Path(cache) if cache else None
        self.done = json.loads(self.cache.read_text()) if self.cache and self.cache.is_file() else {}

    def peak(self, key: str, mode: str) -> float | None:
        settings = settings_of(mode)
        if not self.enabled or missing_library(settings.base_precision) or settings.offload != "none" and key in UNETS:
            return None
        name = f"{key} {mode}"
        if name not in self.done:
            label, resolution = MODELS[key]
            started = time.monotonic()
            offload = "none" if settings.offload == "none" else "diffusers" if "offload-diffusers" in mode else "swap"
            self.done[name] = simulate_run(
                str(ROOT / "tests" / "real_configs" / key), resolution=resolution, batch_size=1, rank=16,
                lora_layers="default", checkpointing=settings.gradient_checkpointing,
                base_precision=settings.base_precision, offload=offload).peak_gb
            print(f"  [{label} {mode}: simulated in {time.monotonic() - started:.0f} s]", file=sys.stderr, flush=True)
            if self.cache:
                self.cache.write_text(json.dumps(self.done, indent=1))
        return self.done[name]


def cell(predicted: float, simulated: float | None) -> str:
    if simulated is None:
        return f"{predicted:.1f} / —"
    return f"{predicted:.1f} / {simulated:.1f} ({100 * (predicted / simulated - 1):+.0f} %)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(ISSUE_19))
    parser.add_argument("--modes", default=MODES)
    parser.add_argument("--no-simulation", action="store_true")
    parser.add_argument("--cache")
    args = parser.parse_args()
    models, modes = args.models.split(","), args.modes.split(",")
    simulations = Simulations(not args.no_simulation, args.cache)
    print("Train-step peak, GB: plan / simulated (plan's error)\n")
    print("| model | " + " | ".join(modes) + " |")
    print("|---" * (len(modes) + 1) + "|")
    for key in models:
        label, resolution = MODELS[key]
        source = str(ROOT / "tests" / "real_configs" / key)
        planner = Planner(family_for(source), source, Run(resolution, 1, 16, "default", "bf16"))
        cells = [cell(train_peak(planner, settings_of(m)), simulations.peak(key, m)) for m in modes]
        print(f"| {label} {resolution} px | " + " | ".join(cells) + " |", flush=True)
    print("\nGoals (issue 19, item 6): what `auto` chooses, the plan's peak over all stages (eval image included),"
          " its train-step peak / the simulated train step, the plan's host RAM peak\n")
    print("| model | GPU | chosen | plan peak | train step: plan / simulated | host RAM (plan) |")
    print("|---|---|---|---|---|---|")
    for key in models:
        label, resolution = MODELS[key]
        source = str(ROOT / "tests" / "real_configs" / key)
        family = family_for(source)
        run = Run(resolution, 1, 16, "default", "bf16", eval_images=True)
        planner = Planner(family, source, Run(resolution, 1, 16, "default", "bf16"))
        for budget in BUDGETS.get(key, (24, 16, 8)):
            try:
                plan = make_plan(family, source, run, base_precision="auto", offload="auto",
                                 gradient_checkpointing=False, budget_gb=budget)
            except DoesNotFit:
                print(f"| {label} {resolution} px | {budget} GB | does not fit | | | |", flush=True)
                continue
            train = cell(train_peak(planner, plan.settings), simulations.peak(key, mode_of(plan.settings)))
            chosen = mode_of(plan.settings)
            print(f"| {label} {resolution} px | {budget} GB | {chosen} | {plan.peak_gb:.1f} | {train} "
                  f"| {plan.host_ram_gb:.1f} |", flush=True)


if __name__ == "__main__":
    main()
