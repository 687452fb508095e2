#!/usr/bin/env bash
# One prepared accelerator check (at most 8 minutes): the brats config's train step time, bf16 MFU
# and peak device memory on one GPU, and sliding-window inference time per 240x240x155 volume with
# and without flip TTA. Run from the repository root on a machine with a GPU and jax[cuda12]:
#   bash launch/gpu_bench.sh > gpu_bench.txt
set -u
PY=${PYTHON:-python}
echo "# $(date -u +%F) $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null)"
timeout 300 "$PY" -m cgc_jax.studies.benchmark --what=train --config=configs/brats.py --batch=2 --steps=5
timeout 170 "$PY" -m cgc_jax.studies.benchmark --what=inference --config=configs/brats.py \
    --volume=240,240,155 --tta=true
