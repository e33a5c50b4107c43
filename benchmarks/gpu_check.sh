#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU, in about 10 minutes,
#   1. the suite's device tests on CUDA (tests/test_devices.py: placement, bf16/fp16 autocast with loss
#      scaling, CUDA against CPU, eval and predict on the GPU; the CPU's DDP test runs too),
#   2. deltatune against HF Trainer + PEFT on the same GPU (full, BitFit, LoRA; MiniLM-L6 and SmolLM2-135M):
#      throughput ratios, peak GPU memory and MFU against the GPU's bf16 peak.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          (default OUT_DIR: runs/gpu-check)
#
# Needs the dev extras (`make venv`, then a CUDA build of torch: pip install torch --index-url
# https://download.pytorch.org/whl/cu124 or the machine's own) and the models and task in the deltatune
# cache (`deltatune fetch minilm-l6 smollm2-135m rotten-tomatoes`, or DELTATUNE_CACHE pointing at a copy):
# nothing is downloaded here. Every step writes under OUT_DIR; a failing step is recorded and the next
# one still runs, and the exit status says whether all passed.
set -u -o pipefail

OUT=${1:-runs/gpu-check}
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its output, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    if ! timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
        echo "   FAILED (exit $?): see $OUT/$name.log"
        status=1
    fi
    tail -n 25 "$OUT/$name.log"
}

"$PYTHON" - <<'EOF' | tee "$OUT/gpu.txt" || exit 1
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"no CUDA GPU visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}); "
             "install a CUDA build of torch")
print(f"GPU: {torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB, "
      f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$OUT/gpu.txt" 2>/dev/null || true

step device-tests 150 "$PYTHON" -m pytest -q -rs tests/test_devices.py

# MiniLM-L6 takes larger batches on a GPU; SmolLM2-135M (135M parameters, full fine-tuning in AdamW) too
step throughput-minilm 180 "$PYTHON" benchmarks/train_throughput.py --device cuda --model minilm-l6 \
    --task rotten-tomatoes --methods full,bitfit,lora --variants deltatune,hf --steps 60 --warmup-steps 10 \
    --rounds 1 --batch-size 64 --dev-examples 500 --out "$OUT/throughput-minilm.md" --json "$OUT/throughput-minilm.json"
step throughput-smollm 210 "$PYTHON" benchmarks/train_throughput.py --device cuda --model smollm2-135m \
    --task rotten-tomatoes --methods full,bitfit,lora --variants deltatune,hf --steps 40 --warmup-steps 10 \
    --rounds 1 --batch-size 32 --dev-examples 300 --out "$OUT/throughput-smollm.md" --json "$OUT/throughput-smollm.json"

echo "== done: results in $OUT (gpu.txt, *.md, *.json, *.log); exit status $status"
exit $status
