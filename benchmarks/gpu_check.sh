#!/usr/bin/env bash
# One short run on a lent GPU machine (torch + Triton, no vLLM), under ~8 minutes:
#   1. the engine's tests that run on CUDA (slots, link, kernels, hybrid host path; no vLLM);
#   2. bench_engine.py at the Mixtral-8x7B layer shape on CUDA: real pinned host→device copies
#      (the link's GB/s), host compute of cold experts beside the device's waves (hybrid rows),
#      against all resident, uniform LRU, host-only, layer split and layer streaming.
# Results go to ${OUT:-benchmarks/results}/engine_cuda.json (+ .png); logs to stdout.
# Not run yet: no session so far had a GPU (see README, "Benchmarks").
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
PY
echo "== engine tests on CUDA"
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_emulation.py \
    -k "cuda" 2>&1 | tail -15
echo "== engine benchmark, Mixtral-8x7B shape"
timeout 420 python benchmarks/bench_engine.py --device cuda --shape mixtral-8x7b --layers 8 \
    --steps 10 --warmup 2 --batch 1 16 --rounds 1 --out "$OUT/engine_cuda.json"
