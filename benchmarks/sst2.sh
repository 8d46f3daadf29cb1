#!/usr/bin/env bash
# SST-2 with all-MiniLM-L6-v2 + LoRA (r=16 on query/key/value/dense), 2000 steps of 32 sentences (about one epoch), on the
# GLUE validation set (872 sentences). Usage: bash benchmarks/sst2_lora.sh [DATA_DIR] [OUTPUT]
set -euo pipefail
DATA=${1:-../shared/data/sst2}
OUT=${2:-out/sst2-lora}
HF_HUB_OFFLINE=1 peftkit train --model minilm-l6 --task classification --method lora --r 16 --alpha 32 \
  --target-modules query,key,value,dense --data "$DATA/train.tsv" --eval-data "$DATA/validation.tsv" \
  --columns text=sentence --output "$OUT" --max-steps 2000 --batch-size 32 --lr 1e-3 --warmup 0.06 \
  --max-length 66 --eval-every 500 --log-every 100
