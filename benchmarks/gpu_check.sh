#!/usr/bin/env bash
# One GPU session's checks and measurements, in order of importance, each under its own time limit
# so that one failure does not lose the rest. Run from the repository root on the GPU machine:
#   bash benchmarks/gpu_check.sh            (writes logs and JSON to $OUT, or benchmarks/results)
# 1. GPU tests of the sketch kernels, and flat memory over 500 padded generate steps.
# 2. End to end, Llama-3-8B shape: dense, SparQ 1/8, sparq-sketch 1/8 (B8 x 32k, B1 x 128k).
# 3. Kernel step: sketch (1/2 bits) vs paper SparQ vs best dense (benchmarks/sketch_bench.py).
# 4. GPU tests of the paper's kernels vs the reference (edge configurations, left padding, graphs).
# 5. The randomised fuzz over the whole accepted space (benchmarks/gpu_fuzz.py), time-boxed, for the
#    paper's method and for sparq-sketch (FUZZ_METHOD=sketch).
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
timeout 150 python -m pytest -q -x -p no:cacheprovider tests/test_sketch_kernels.py tests/test_gpu_memory.py -s 2>&1 \
  | grep -v Warning | tee "$OUT/gpu-tests-sketch-memory.log" | tail -8
for shape in "8 32768" "1 131072"; do
  set -- $shape
  timeout 200 python -m sparq.tools.cli bench generate --model llama3-8b --batch "$1" --context "$2" --compressions 8 \
    --sketch 8 --auto 0 --new-tokens 48 --out-dir "$OUT" 2>&1 | grep -v Warn | grep "|\|wrote\|rror" | tail -6
done
timeout 150 python benchmarks/sketch_bench.py 2>&1 | grep -v Warn | tail -14
timeout "${TESTS_S:-120}" python -m pytest -q -p no:cacheprovider tests/test_kernels.py \
  -k "match_reference or edge or padded or graph or long_context" 2>&1 | grep -v Warning | tee "$OUT/gpu-tests-kernels.log" | tail -6
FUZZ_WORKERS=14 FUZZ_SECONDS="${FUZZ_S:-70}" timeout 150 python benchmarks/gpu_fuzz.py 2000 "${FUZZ_SEED:-23}" 2>&1 \
  | grep -v "cases, " | tail -22
FUZZ_METHOD=sketch FUZZ_WORKERS=14 FUZZ_SECONDS="${FUZZ_S:-70}" timeout 150 python benchmarks/gpu_fuzz.py 2000 "${FUZZ_SEED:-23}" 2>&1 \
  | grep -v "cases, " | tail -22
