#!/usr/bin/env bash
# Every check that needs a Hopper GPU, in one pass sized for one device call (about 8 minutes on an H100 or
# H200), each step under its own time limit so that a slow one cannot take the others down. Written for the
# device tool's machine, whose python3 holds PyTorch with CUDA and most of our dependencies; tomli-w is not
# there, so carry it as a wheel (here: `pip download tomli-w -d .whl`, then `run` with carry [".whl"]):
#
#     OUT=$OUT bash benchmarks/gpu_checks.sh          # outputs and a summary under $OUT (default runs/gpu_checks)
#
# Steps: the GPU environment; tests/test_fp8_gpu.py and tests/test_tune_gpu.py (hopper backend against the emulated
# reference on the GPU, for training and for a frozen FP8 base under LoRA; LoRA experts on grouped_mm);
# fp8_speed.py (FP8 against BF16 GEMMs at deepseek-v2-lite and deepseek-v3 shapes, and a >1B-parameter step);
# train_step_vs_hf.py on the GPU (bf16); fp8_parity.py with the builtin loop at a GPU-sized batch (bf16 peer).
# Until a session runs it on a lent GPU, this script itself is untested on one.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_checks}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --find-links .whl tomli-w > "$OUT/pip.txt" 2>&1 || true
fi

step() {  # step NAME SECONDS CMD...: run CMD under a time limit, keep its output, print its last lines
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s: $*" | tee -a "$OUT/summary.txt"
  tail -n 4 "$OUT/$name.txt" | tee -a "$OUT/summary.txt"
}

step env 60 $PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), \
torch.cuda.get_device_capability()); from frugallm.precision.backends import hopper_unavailable_reason as r; \
print('hopper backend:', r() or 'available')"
step tests 150 $PY -m pytest -q -p no:cacheprovider tests/test_fp8_gpu.py tests/test_tune_gpu.py
step fp8_speed 180 $PY benchmarks/fp8_speed.py
step train_step 90 $PY benchmarks/train_step_vs_hf.py --device cuda --dtype bfloat16 --steps 8
step fp8_parity 150 $PY benchmarks/fp8_parity.py --loop builtin --steps 300 --batch-size 64 --seq-len 512 \
  --control --out-dir "$OUT/parity"
grep -h "^RESULT" "$OUT"/*.txt | tee -a "$OUT/summary.txt"
