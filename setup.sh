#!/usr/bin/env bash
# Transformer Lab runs this in the plugin's virtual environment, on top of the Lab's own torch,
# diffusers and transformers. It only adds or upgrades what requirements.txt asks for, never
# replaces a torch that satisfies it, and is safe to run twice. xFormers is deliberately not
# installed: a build that does not match the installed torch breaks imports (PyTorch's own SDPA
# attention is used instead).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python_bin="$(command -v python || command -v python3)"
if command -v uv >/dev/null 2>&1; then
  uv pip install --python "$python_bin" -r "$here/requirements.txt"
else
  "$python_bin" -m pip install -r "$here/requirements.txt"
fi
