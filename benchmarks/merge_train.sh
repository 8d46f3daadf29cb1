#!/usr/bin/env bash
# The two MiniLM-L6 task adapters of the merge benchmark (LoRA r=16 on query/key/value/dense, lr 1e-3; each run
# under 10 min on 2 cores): SST-2 (400 steps x 32 sentences, a subsample of one epoch) and the generated 4-topic task
# (50 steps x 16 of 8,000 sentences, lr 2e-3: the shared machine was saturated). Then: python benchmarks/merge_tasks.py
# Usage: bash benchmarks/merge_train.sh [SST2_DIR] [OUT]
set -euo pipefail
DATA=${1:-../shared/data/sst2}
OUT=${2:-out}
LORA=(--method lora --r 16 --alpha 32 --target-modules query,key,value,dense --warmup 0.06 --seed 0)
python benchmarks/merge_topic_data.py --output "$OUT/topic"
HF_HUB_OFFLINE=1 nice -n 10 peftkit train --model minilm-l6 --task classification "${LORA[@]}" \
  --data "$DATA/train.tsv" --eval-data "$DATA/validation.tsv" --columns text=sentence --output "$OUT/sst2" --overwrite \
  --lr 1e-3 --batch-size 32 --max-steps 400 --max-length 66 --eval-every 400 --log-every 50
HF_HUB_OFFLINE=1 nice -n 10 peftkit train --model minilm-l6 --task classification "${LORA[@]}" \
  --data "$OUT/topic/train.tsv" --eval-data "$OUT/topic/validation.tsv" --columns text=sentence --output "$OUT/topic-run" --overwrite \
  --lr 2e-3 --batch-size 16 --max-steps 50 --max-length 24 --eval-every 50 --log-every 5
