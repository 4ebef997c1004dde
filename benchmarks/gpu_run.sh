#!/usr/bin/env bash
# Everything a lent GPU machine does in one device call: build the extension, run the GPU
# tests, run the ResNet-50 benchmarks. Logs and JSON go under $OUT (the device tool brings
# them back); copy the JSON into benchmarks/results/ with the run's date and device.
#   device run: bash benchmarks/gpu_run.sh
set -uo pipefail
OUT=${OUT:-benchmarks/results/local}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
    nvidia-smi
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    git rev-parse HEAD
} > "$OUT/environment.txt" 2>&1

python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
    || { tail -30 "$OUT/build.log"; exit 1; }

python3 -m pytest -q -m gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -5

for mode in train eval; do
    python3 -m fused_resnet.bench --model resnet50 --mode "$mode" --dtype bf16 \
        --batch-size 256 --json "$OUT/resnet50_${mode}_bf16.json" 2>&1 \
        | tee "$OUT/resnet50_${mode}_bf16.txt"
done
