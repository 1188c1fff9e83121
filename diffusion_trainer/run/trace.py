"""Debugging: with DIFFUSION_TRAINER_TRACE_DIR set, each process records what it trained on."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

TRACE_ENV = "DIFFUSION_TRAINER_TRACE_DIR"  # where each process writes what it trained on


class TracedLoader:
    """With DIFFUSION_TRAINER_TRACE_DIR set, each process appends one JSON line per batch to
    <dir>/rank<k>.jsonl: the epoch, the dataset indices of the batch, the learning rate its
    optimizer step uses and a digest of the RNG state its noise and timesteps are drawn from.
    Iterating and len() are the wrapped loader's own."""

    def __init__(self, loader: Any, samples: Any, optimizer: Any, folder: Path, rank: int):
        self.loader, self.samples, self.optimizer = loader, samples, optimizer
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"rank{rank}.jsonl"
        self.path.write_text("")

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __iter__(self):
        with self.path.open("a") as out:
            for batch in self.loader:
                line = {"epoch": self.samples.epoch, "indices": batch["index"].tolist(),
                        "lr": self.optimizer.param_groups[0]["lr"], "rng": rng_digest()}
                if "class" in batch:  # prior preservation: the class partners
                    line["class_indices"] = batch["class"]["index"].tolist()
                out.write(json.dumps(line) + "\n")
                out.flush()
                yield batch


def rng_digest() -> str:
    """Which noise the next draws give: the torch generator this process draws noise from."""
    import hashlib

    state = torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.random.get_rng_state()
    return hashlib.sha1(state.numpy().tobytes()).hexdigest()[:16]


def traced(loader: Any, samples: Any, optimizer: Any, rank: int) -> Any:
    folder = os.environ.get(TRACE_ENV, "").strip()
    return TracedLoader(loader, samples, optimizer, Path(folder), rank) if folder else loader
