"""What a run must never destroy, checked before anything loads.

- The adapter folder is replaced only when this trainer wrote it (its info file says so); a
  dataset, or any other folder that happens to have the adapter's name, is refused by name.
- The adapter folder may not hold, or sit inside, the dataset or another folder the run writes.
- One run at a time writes an output folder: `.<adaptor_name>.lock` beside the adapter names the
  run holding it; a lock left by a process that is gone (killed, machine rebooted) is taken over.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ..errors import InputError


def is_our_adapter(folder: Path, info_name: str) -> bool:
    try:
        return json.loads((folder / info_name).read_text()).get("tlab_trainer_used") is True
    except (OSError, ValueError, AttributeError):
        return False


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_adapter_target(adapter_dir: Path, info_name: str, dataset_dir: Path | None,
                         other_outputs: list[Path]) -> None:
    """Refuse, naming the folder, a target this run may not replace."""
    target = adapter_dir.expanduser().resolve()
    if dataset_dir is not None:
        data = dataset_dir.expanduser().resolve()
        if _inside(data, target):  # an output folder inside the dataset is skipped when it is read (data/sources.py)
            raise InputError(
                f"adaptor_name: the adapter would be written to '{adapter_dir}', which is or holds the dataset "
                f"'{dataset_dir}'; saving it there would replace your images. Choose another adaptor_name "
                "or output_dir.")
    for other in other_outputs:
        if _inside(other.expanduser().resolve(), target):
            raise InputError(f"adaptor_name: the adapter folder '{adapter_dir}' would replace '{other}', which "
                             "this run also writes; choose another adaptor_name.")
    if target.exists() and not (target.is_dir() and is_our_adapter(target, info_name)):
        raise InputError(
            f"adaptor_name: '{adapter_dir}' already exists and is not an adapter this trainer wrote (no {info_name} "
            "in it); it is left untouched. Choose another adaptor_name or output_dir, or move that folder away.")


class OutputLock:
    """`.<name>.lock` in `folder`, held while a run writes its outputs."""

    def __init__(self, folder: Path, name: str):
        self.path = folder / f".{name}.lock"
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and self._alive(holder):
                    raise InputError(
                        f"output_dir: another run is writing this adapter's outputs (process {holder.get('pid')} on "
                        f"{holder.get('host')}, started {holder.get('started')}; lock file {self.path}). Wait for it, "
                        "stop it, or choose another adaptor_name.") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            self.held = True
            return

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # half written or unreadable: treated as stale

    @staticmethod
    def _alive(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return True  # another machine's run: we cannot tell, so respect it
        try:
            os.kill(int(holder["pid"]), 0)
        except (ProcessLookupError, KeyError, ValueError, TypeError):
            return False
        except PermissionError:
            return True
        return True

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
