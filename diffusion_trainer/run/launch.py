"""Run main.py on every visible GPU: `python -m diffusion_trainer.run.launch [main.py's arguments]`.

With more than one visible GPU this becomes `accelerate launch --num_processes <GPUs> main.py …`
(one process per GPU, data-parallel); with one GPU or none, plain `python main.py …`. Choose
the GPUs with CUDA_VISIBLE_DEVICES. Already inside a distributed launch (torchrun, accelerate
launch), it runs main.py as it is. Transformer Lab tasks use this as their `run` line, so a task
whose resources ask for several GPUs trains on all of them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

MAIN = Path(__file__).resolve().parents[2] / "main.py"


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def command(gpus: int, args: list[str], python: str = sys.executable, already_launched: bool = False) -> list[str]:
    """The command line to run: accelerate's launcher for several GPUs, else main.py itself."""
    if gpus > 1 and not already_launched:
        return [python, "-m", "accelerate.commands.launch", "--num_processes", str(gpus), "--num_machines", "1",
                "--dynamo_backend", "no", str(MAIN), *args]
    return [python, str(MAIN), *args]


def main(argv: list[str] | None = None) -> None:
    from .processes import launched_distributed

    args = sys.argv[1:] if argv is None else argv
    gpus = 0 if launched_distributed() else visible_gpus()
    argv_to_run = command(gpus, args, already_launched=launched_distributed())
    if gpus > 1:
        print(f"{gpus} GPUs visible: {' '.join(argv_to_run)}", file=sys.stderr, flush=True)
    os.execv(argv_to_run[0], argv_to_run)  # the same process: the Lab's stop signal reaches the launcher


if __name__ == "__main__":
    main()
