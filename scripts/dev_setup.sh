#!/usr/bin/env bash
# Set up a development environment in .venv: CPU torch, the package with every extra, and Debian's chromium
# for the Space's browser tests (Playwright drives /usr/bin/chromium; it never downloads a browser).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch; on a GPU machine install the CUDA build of your choice instead.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
# transformers 4.57 beside the project's 5.x, for tests/test_older_transformers.py (merged checkpoints must load in
# the older stacks that serve models): a --target folder used only by that test's subprocess, never on sys.path here.
.venv/bin/python -m pip install -q --no-warn-conflicts --target .venv/transformers-4.57 --upgrade \
  "transformers==4.57.*" "huggingface_hub<1.0" "tokenizers<0.23"
