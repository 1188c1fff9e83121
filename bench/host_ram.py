"""Host RAM while the denoiser loads, in each base_precision, measured through the run's own loading
(run/setup.load_denoiser) on a FLUX.1-dev-width transformer (its real config, 2 double and 4 single
blocks: 1.31 B parameters, 2.62 GB in bf16, saved in bf16 shards of at most 1 GB, as the real one's
are a third of the model each) in a pipeline whose text encoders and VAE are tiny.

Each mode loads in a fresh process; a thread reads the process's anonymous resident memory
(RssAnon: what the process itself holds, not the file pages the OS may drop) every 2 ms, and the
figure is its peak above what the process held before the denoiser began loading, and that peak
less the stored weights (which, run with --blocks 1,2, does not grow with the model: a tensor's or a
layer's temporaries, not a copy of the model). About 2 minutes on a 2-core CPU; no GPU needed.

    python bench/host_ram.py [--modes bf16,fp8,fp8-whole,int8,nf4] [--blocks 2,4] [--keep /tmp/wide_flux]

`fp8-whole` is fp8 read the way it was before memory/cast_loading.py (and still is where the files
cannot be read tensor by tensor): from_pretrained in bf16, then layerwise casting.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GB = 1e9


def build(folder: Path, double: int, single: int) -> None:
    import torch
    from diffusers import FluxTransformer2DModel

    from diffusion_trainer.demo.tiny_models import save_pipeline, tiny_flux_pipeline

    if (folder / "model_index.json").is_file():
        return
    save_pipeline(tiny_flux_pipeline(), folder)
    config = json.loads((ROOT / "tests/real_configs/flux1_dev/transformer/config.json").read_text())
    config.update(num_layers=double, num_single_layers=single)
    torch.manual_seed(0)
    with torch.device("cpu"):
        wide = FluxTransformer2DModel.from_config(config).to(torch.bfloat16)
    for old in (folder / "transformer").iterdir():
        old.unlink()
    wide.save_pretrained(folder / "transformer", max_shard_size="1GB", safe_serialization=True)


def measure(folder: str, mode: str) -> dict:
    """In this (fresh) process: load the denoiser as a run in `mode` does; the peak RssAnon above the
    process's before loading, and the weights' stored bytes."""
    import threading
    import time

    import torch

    from diffusion_trainer.families.flux import Flux
    from diffusion_trainer.memory import storage
    from diffusion_trainer.run import setup

    def status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field} in /proc/self/status")

    def anon() -> int:
        return status("RssAnon")

    class Quiet:
        def info(self, message: str) -> None:
            pass

    precision, _, mixed = mode.partition("@")
    mixed = {"fp32": "no", "": "bf16"}[mixed]
    family = Flux.load(folder, setup.WEIGHT_DTYPES[mixed], without_denoiser=True)
    accelerator = type("Accelerator", (), {"device": torch.device("cpu")})()
    runtime = setup.Runtime(mixed, False)
    peak, done = [anon()], threading.Event()
    before, resident_before = peak[0], status("VmRSS")

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], anon())
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    if precision.endswith("-whole"):  # the from_pretrained path, as a run takes it when read_cast returns None
        setup.read_cast_denoiser = lambda *args: None
    denoiser = setup.load_denoiser(family, precision.removesuffix("-whole"), "none", runtime, accelerator, Quiet())
    done.set()
    watcher.join()
    return {"mode": mode, "peak_bytes": max(peak[0], anon()) - before, "stored_bytes": storage.stored_bytes(denoiser),
            "resident_bytes": status("VmHWM") - resident_before,
            "parameters": sum(p.numel() for p in denoiser.parameters())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="bf16,fp8,fp8-whole,fp8@fp32,fp8-whole@fp32,bf16@fp32,"
                                                 "bf16-whole@fp32,int8,nf4")
    parser.add_argument("--blocks", default="2,4", help="double,single blocks of the transformer (default 2,4)")
    parser.add_argument("--keep", help="build the model here (and reuse it) instead of a temporary folder")
    parser.add_argument("--measure", nargs=2, metavar=("FOLDER", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return 0
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(args.keep or temporary) / "wide_flux" if not args.keep else Path(args.keep)
        build(folder, *map(int, args.blocks.split(",")))
        print("| base_precision | weights stored | host RAM peak while loading (anonymous) | peak - stored | "
              "resident peak, file pages included |")
        print("|---|---|---|---|---|")
        for mode in args.modes.split(","):
            out = subprocess.run([sys.executable, __file__, "--measure", str(folder), mode], capture_output=True,
                                 text=True, cwd=ROOT)
            if out.returncode:
                print(f"| {mode} | failed: {out.stderr.strip().splitlines()[-1]} |")
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {mode} | {row['stored_bytes'] / GB:.2f} GB | {row['peak_bytes'] / GB:.2f} GB | "
                  f"{(row['peak_bytes'] - row['stored_bytes']) / GB:+.2f} GB | {row['resident_bytes'] / GB:.2f} GB |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
