#!/usr/bin/env bash
# The speed figures of issue 12 on a GPU machine with no network, in one call (under 5 minutes on an H200).
#
# Prepare here (network to PyPI):   make gpu-bundle
#   -> .whl/  pytorch-metric-learning and faiss-cpu wheels for Python 3.12 (what such a machine lacks)
#   -> .data/fashion-mnist/  the Fashion-MNIST .gz files
# Run there, from the repository root, carrying .whl and .data:
#   bash benchmarks/gpu_check.sh            # DEVICE=cpu PER_CLASS=100 for a dry run on the CPU
set -euo pipefail
DEVICE=${DEVICE:-cuda}
PER_CLASS=${PER_CLASS:-0}          # 0: all 54,000 training rows
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if ! python3 -c "import pytorch_metric_learning, faiss" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
DATA=${DATA:-$PWD/.data/fashion-mnist}
[ -d "$DATA" ] || DATA=/usr/share/datasets/fashion-mnist
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
python3 benchmarks/bench_speed.py --device "$DEVICE" --data-dir "$DATA" --per-class "$PER_CLASS" --width 32 \
  --batch 128 --epochs 3 --k 200 --update-interval 2 --repeats 50 2>&1 | tee "$OUT/speed.txt"
python3 benchmarks/bench_exact_search.py --device "$DEVICE" 2>&1 | tee "$OUT/search.txt"
