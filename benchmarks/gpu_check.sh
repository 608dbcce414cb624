#!/usr/bin/env bash
# The GPU path in one prepared run (issue 12): the engine tests with every merge on CUDA, then the real-shape
# benchmark (Mixtral-8x7B, Qwen1.5-MoE-A2.7B and Qwen3-30B-A3B layer shapes, default method and --paper) on CUDA,
# printing every figure. Sized to finish in under 8 minutes on one H200-class GPU.
#
#   bash benchmarks/gpu_wheels.sh            # here, once: the wheels the GPU machine's image lacks, into .whl/
#   bash benchmarks/gpu_check.sh             # on the GPU machine (carry .whl); logs go to $OUT (or /tmp/gpu_check)
#   bash benchmarks/gpu_check.sh --cpu-smoke # anywhere: the same steps on the CPU at 1/16 of every width
set -euo pipefail
cd "$(dirname "$0")/.."
LOGS=${OUT:-/tmp/gpu_check}
mkdir -p "$LOGS"
PY=${PYTHON:-python3}
DEVICE=cuda SCALE=1 THREADS=$(nproc)
if [ "${1:-}" = "--cpu-smoke" ]; then DEVICE=cpu SCALE=16 THREADS=2; fi
# The carried wheels are built for the GPU machine's Python 3.12: installed there only.
if [ "$DEVICE" = cuda ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
$PY - <<PYEOF | tee "$LOGS/env.log"
import torch, transformers, platform
print("python", platform.python_version(), "torch", torch.__version__, "transformers", transformers.__version__)
if "$DEVICE" == "cuda":
    assert torch.cuda.is_available(), "no CUDA device visible"
    print("gpu", torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
PYEOF
start=$(date +%s)
HC_SMOE_TEST_DEVICE=$DEVICE $PY -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_math.py \
  tests/test_synthetic_shapes.py 2>&1 | tee "$LOGS/tests.log"
echo "engine tests on $DEVICE: $(( $(date +%s) - start )) s" | tee -a "$LOGS/tests.log"
$PY benchmarks/real_shapes.py --device "$DEVICE" --scale "$SCALE" --threads "$THREADS" \
  --workdir /tmp/hcsmoe-shapes 2>&1 | tee "$LOGS/real_shapes.log"
echo "gpu_check finished in $(( $(date +%s) - start )) s"
