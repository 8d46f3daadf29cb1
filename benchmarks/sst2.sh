#!/usr/bin/env bash
# SST-2 with all-MiniLM-L6-v2: LoRA (r=16 on query/key/value/dense, lr 1e-3) or full fine-tuning (every weight, lr 5e-5),
# 2000 steps of 32 sentences (about one epoch), scored on the GLUE validation set (872 sentences).
# Usage: bash benchmarks/sst2.sh lora|full [DATA_DIR] [OUTPUT]
set -euo pipefail
KIND=${1:-lora}
DATA=${2:-../shared/data/sst2}
OUT=${3:-out/sst2-$KIND}
case "$KIND" in
  lora) METHOD=(--method lora --r 16 --alpha 32 --target-modules query,key,value,dense --lr 1e-3 --head-lr 1e-3) ;;
  full) METHOD=(--method full --lr 5e-5) ;;
  *) echo "usage: bash benchmarks/sst2.sh lora|full [DATA_DIR] [OUTPUT]" >&2; exit 2 ;;
esac
HF_HUB_OFFLINE=1 peftkit train --model minilm-l6 --task classification "${METHOD[@]}" \
  --data "$DATA/train.tsv" --eval-data "$DATA/validation.tsv" --columns text=sentence --output "$OUT" --overwrite \
  --max-steps 2000 --batch-size 32 --warmup 0.06 --max-length 66 --eval-every 500 --log-every 100
