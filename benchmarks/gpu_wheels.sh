#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels that benchmarks/gpu_check.sh installs on a GPU machine without a
# registry: what the project needs beyond that machine's image (torch, tokenizers, huggingface_hub, safetensors,
# scipy are there; transformers is older than the project's minimum). They land in .whl/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "transformers==5.24.0"
ls -l .whl
