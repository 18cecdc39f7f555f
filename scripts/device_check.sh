#!/usr/bin/env bash
# The GPU checks in one run (for a lent GPU machine, which has torch, transformers, peft and accelerate but not
# diffusers, bitsandbytes or gradio): the CUDA tests, then bench/real_scale.py's rows on the GPU. Prepare once on
# this machine (the wheels travel with the call in .wheels/, which .git/info/exclude ignores):
#     mkdir -p .wheels && .venv/bin/python -m pip download -d .wheels --no-deps diffusers bitsandbytes \
#         --platform manylinux_2_24_x86_64 --only-binary=:all: --python-version 3.11
# then run on the device with carry [".wheels"]:  bash scripts/device_check.sh   (results land in $OUT)
# Budget: about 1 min install, 2 min CUDA tests, 5 min for the SD1.5 rows and the SDXL training rows; the rest of
# the SDXL rows only when time is left (ROWS=all).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/device_out}"; mkdir -p "$OUT"
python -m pip install -q --no-deps .wheels/*.whl safetensors pytest 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
export HF_HUB_OFFLINE=1 PYTHONPATH=.
timeout 180 python -m pytest -q -m cuda tests/core/test_cuda.py -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/cuda_tests.txt"
rows=(--family sd15 --role score)
[ "${ROWS:-}" = all ] && rows=()
timeout 300 python bench/real_scale.py "${rows[@]}" --out "$OUT/real_scale_cuda.json" 2>&1 | grep -v '^\[' | tail -20
[ "${ROWS:-}" = all ] || timeout 200 python bench/real_scale.py --family sdxl --stage train --mode bf16 \
    --out "$OUT/real_scale_cuda.json" 2>&1 | grep -v '^\[' | tail -5
python bench/real_scale.py --out "$OUT/real_scale_cuda.json" --markdown "$OUT/real_scale_cuda.md"
