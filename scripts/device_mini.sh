#!/usr/bin/env bash
# A wider mini on a lent GPU (issue 19, deliverable 4: a mini whose adapters learn an unseen texture), in one run
# of about nine minutes. On the CPU even every weight of the shipped 4.3 M-parameter UNet learns a tuning style
# only to 0.41 identification (bench/README.md, "Longer training"): the base, not the adapter, is the limit.
#
# Prepare once on this machine (the diffusers wheel travels in .wheels/, which .gitignore keeps out of git):
#     mkdir -p .wheels && .venv/bin/python -m pip download -d .wheels --no-deps diffusers \
#         --platform manylinux_2_24_x86_64 --only-binary=:all: --python-version 3.11
# then run on the device with carry [".wheels"] and timeout_s 590:  bash scripts/device_mini.sh
#
# Steps: the training data rendered over the CPU cores (the same images as one process renders); a fresh UNet of
# WIDTHS trained MINUTES on the GPU on the shipped VAE and text encoders, half of each batch from the concept
# family; then the tuning split's styles (and subjects with KINDS=style,subject) personalised with mini's
# family defaults on the shipped mini and on the wider one, on the same GPU, so the two rows compare.
# What comes back in $OUT: the curve and log of the training, personalization_gpu.json, and the wider mini as
# mini_wide.tgz.part-* (cat them, untar into runs/, then `bench/personalization_split.py --mini runs/mini_wide`
# on the CPU measures it as the committed rows were).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/device_out}"; mkdir -p "$OUT"
WIDTHS="${WIDTHS:-64,128,256}"; MINUTES="${MINUTES:-4}"; KINDS="${KINDS:-style}"; WORKERS="${WORKERS:-14}"
DEVICE="${DEVICE:-cuda}"  # DEVICE=cpu with TRAIN_EXTRA="--n-data 64 --n-family 64 ..." and CONCEPTS=one: a dry run
if [ "$DEVICE" = cuda ]; then
    python -m pip install -q --no-deps .wheels/diffusers-*.whl 2>&1 | tail -2
    nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
fi
export HF_HUB_OFFLINE=1 PYTHONPATH=.
rm -rf runs/mini_wide runs/mini_wide_state && mkdir -p runs && cp -r assets/mini runs/mini_wide
# --force: the VAE is the shipped one, whose gate passed (scripts/mini_log/vae_gate.json); the log is new
timeout $(( MINUTES * 60 + 200 )) python scripts/train_mini.py unet --out runs/mini_wide --state runs/mini_wide_state \
    --log "$OUT/mini_wide_log" --device "$DEVICE" --unet-channels "$WIDTHS" --batch 128 --lr 4e-4 --family-share 0.5 \
    --render-workers "$WORKERS" --threads 8 --force --max-minutes "$MINUTES" --checkpoint-minutes 2 \
    --eval-minutes 2 --eval-n 48 --log-every 500 ${TRAIN_EXTRA:-} 2>&1 | tail -12
tar czf - -C runs mini_wide | split -b 15m - "$OUT/mini_wide.tgz.part-"
for mini in assets/mini runs/mini_wide; do
    timeout 150 python bench/personalization_split.py --mini "$mini" --split tuning --kinds "$KINDS" --images 32 \
        --concepts "${CONCEPTS:-}" --label "$DEVICE:tuning:$(basename "$mini")" \
        --out "$OUT/personalization_gpu.json" 2>&1 | grep -E "^(tuning_|\{)" | cut -c1-160
done
