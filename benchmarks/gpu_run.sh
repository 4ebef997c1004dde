#!/usr/bin/env bash
# Everything a lent GPU machine does, in one device call: build the extension, run the GPU
# tests, run the recorded benchmarks. Logs, JSON, markdown tables and charts go under $OUT
# (the device tool brings them back); commit them to benchmarks/results/<date>-<device>/.
#   device run:  bash benchmarks/gpu_run.sh [build] [tests] [traffic] [models] [blocks] [suites]
#                [train]
# With no part named it runs build, tests, traffic, models and blocks; a device call is limited to
# 10 minutes, so a long session runs the parts in separate calls (build is kept between
# calls on a warm machine).
set -uo pipefail
OUT=${OUT:-benchmarks/results/local}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
parts=${*:-build tests traffic models blocks}
wants() { [[ " $parts " == *" $1 "* ]]; }

versions=$(python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1)
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
{
    nvidia-smi
    echo "$versions"
    echo "$commit"
} > "$OUT/environment.txt" 2>&1
# Every log and table starts with the versions and commit it ran with (the JSON files
# record them in their "environment").
stamped() { { echo "# $versions, commit $commit"; cat; } > "$1"; }

# The GPU machines have no network and no nvidia-cutlass (the CUTLASS headers the build
# needs): a session carries its wheel in .whl/ (benchmarks/README.md) and it goes beside
# the machine's own packages.
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if wants build; then
    start=$SECONDS
    python3 -m pip install --no-build-isolation --no-deps -e . 2>&1 | stamped "$OUT/build.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { tail -30 "$OUT/build.log"; exit 1; }
    echo "extension build: $((SECONDS - start)) s" | tee -a "$OUT/build.log"
fi

if wants tests; then
    python3 -m pytest -q -m gpu 2>&1 | tee >(stamped "$OUT/gpu_tests.log") | tail -5
fi

bench() {  # name, then fused-resnet-bench arguments
    local name=$1; shift
    python3 -m fused_resnet.bench "$@" --json "$OUT/$name.json" --plot "$OUT/$name.png" \
        2>&1 | tee >(stamped "$OUT/$name.txt")
    python3 -m fused_resnet.bench.report "$OUT/$name.json" | stamped "$OUT/$name.md"
}

# The counted launches and bytes (no GPU needed) of the commit whose speed is measured
# next, so that the count and the hardware can be compared.
if wants traffic; then
    python3 -m fused_resnet.bench --traffic --json "$OUT/traffic.json" 2>&1 \
        | tee >(stamped "$OUT/traffic.txt")
fi

if wants models; then
    bench resnet50_bf16 --model resnet50 --mode train eval --dtype bf16 --batch-size 256
fi

if wants blocks; then
    bench blocks_bf16 --model resnet50 resnet18 --blocks --mode train eval --dtype bf16 \
        --batch-size 128 256 --warmup 5 --iterations 20
fi

if wants suites; then
    python3 -m pytest benchmarks -q --benchmark-json="$OUT/suites.json" 2>&1 \
        | tee >(stamped "$OUT/suites.log") | tail -40
fi

# A short training run per fused backend, each in lockstep with eager from the same
# weights on the same batches (fused_resnet.train --compare): per-epoch losses, accuracies,
# images/s and the weights' relative difference, under $OUT/train_<backend>/ (log.jsonl,
# summary.md, curves.png). CIFAR-10 when a session carries it to
# benchmarks/data/cifar-10-batches-py (the machines have no network), else synthetic
# images. Each run is capped so both fit one device call; its log keeps the epochs done.
# TRAIN_BACKENDS, TRAIN_ARGS, TRAIN_DATA and TRAIN_TIMEOUT (seconds per run) override the
# defaults; a CPU rehearsal: TRAIN_BACKENDS=reference TRAIN_ARGS="--epochs 1 --batch-size 8"
# TRAIN_DATA="--fake-data 16 --image-size 16" bash benchmarks/gpu_run.sh train
if wants train; then
    if [ -d benchmarks/data/cifar-10-batches-py ]; then
        data="--data benchmarks/data"
    else
        data="--fake-data 10000"
    fi
    for backend in ${TRAIN_BACKENDS:-triton cuda}; do
        timeout "${TRAIN_TIMEOUT:-270}" python3 -m fused_resnet.train --compare "eager,$backend" \
            ${TRAIN_ARGS:---model resnet18 --amp bf16 --channels-last --epochs 3 --batch-size 256} \
            ${TRAIN_DATA:-$data} --out "$OUT/train_$backend" 2>&1 \
            | tee >(stamped "$OUT/train_$backend.txt")
        # Two ResNet-18s with their optimizer states: too large to bring back or commit.
        rm -f "$OUT/train_$backend/checkpoint.pt"
    done
fi
