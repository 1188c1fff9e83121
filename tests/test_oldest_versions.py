"""The package imports and trains every family on the oldest library versions requirements.txt
allows (its floors), so a floor that does not work fails here instead of on a user's machine.

The floors are installed once, with pip, into .oldest-stack/<hash>/ (git-ignored, reused until the
floors change) and put in front of this environment's packages in a subprocess, which keeps torch
and everything else from the environment. Needs PyPI the first time.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest import ROOT

# Libraries whose floor is tested (others, like torch, come from the environment).
FLOORED = ("diffusers", "transformers", "peft", "accelerate", "datasets", "huggingface_hub", "safetensors",
           "tqdm", "pydantic", "pillow")
# What those exact versions need beside them, older than this environment's copies.
COMPANIONS = (
    "tokenizers==0.20.3",  # transformers 4.46: tokenizers >=0.20,<0.21
    "pydantic-core==2.18.1",  # pydantic 2.7.0's own core
    "fsspec==2024.6.1", "dill==0.3.8", "multiprocess==0.70.16",  # datasets 3.0: fsspec<=2024.6.1, dill<0.3.9
)


def floors() -> list[str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,;\s]*)", line)
        if match and match.group(1).lower() in FLOORED:
            pins[match.group(1).lower()] = f"{match.group(1)}=={match.group(2)}"
    assert sorted(pins) == sorted(FLOORED), f"requirements.txt has no floor for {set(FLOORED) - set(pins)}"
    return [pins[name] for name in FLOORED]


def oldest_stack(pins: list[str]) -> str:
    """The folder holding the pinned libraries, installed on first use."""
    folder = ROOT / ".oldest-stack" / hashlib.sha256(" ".join(pins).encode()).hexdigest()[:12]
    if not (folder / ".complete").is_file():
        folder.parent.mkdir(exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".partial-", dir=folder.parent)
        try:
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                            "--disable-pip-version-check", "--target", staging, *pins], check=True, timeout=600)
            (Path(staging) / ".complete").write_text("\n".join(pins) + "\n")
            shutil.rmtree(folder, ignore_errors=True)
            os.rename(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return str(folder)


def test_every_module_imports_and_every_family_trains_on_the_oldest_allowed_libraries(tmp_path):
    pins = floors()
    stack = oldest_stack(pins + list(COMPANIONS))
    env = {**os.environ, "PYTHONPATH": stack, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    names = [pin.split("==")[0] for pin in pins]
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "oldest_stack_run.py"), str(tmp_path), *names],
                            env=env, capture_output=True, text=True, timeout=1200)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    for pin in pins:  # the old versions really were the ones imported
        assert f"version {pin}" in result.stdout, output[-3000:]
    for family in ("sd", "sdxl", "sd3", "sd3_without_t5", "flux"):
        assert f"{family}: exit 0" in result.stdout, output[-6000:]
