#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels that benchmarks/gpu_check.sh installs on a GPU machine without a
# registry: what the project needs beyond that machine's image (torch, tokenizers, safetensors, scipy are there;
# its transformers and huggingface_hub are older than the project's minimum, and huggingface_hub 2.x brings new
# dependencies). Each is pinned to the version in this checkout's .venv, so the GPU runs what the tests here ran.
# They land in .whl/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PYTHON:-.venv/bin/python}
pins=$($PY - <<'PYEOF'
from importlib.metadata import version
names = ["transformers", "huggingface_hub", "httpx2", "httpcore2", "click", "hf-xet", "kernels", "truststore", "tomlkit", "idna"]
print(" ".join(f"{n}=={version(n)}" for n in names))
PYEOF
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl $pins
ls -l .whl
