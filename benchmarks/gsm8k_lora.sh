#!/usr/bin/env bash
# GSM8K with SmolLM2-135M-Instruct + LoRA (r=16 on every linear layer of the blocks) for a fixed step budget.
# Exact match (the number after "####", else the last number generated) on the first 200 test problems,
# greedy decoding of up to 256 tokens, before (the base model) and after training. Prompts go through the
# model's chat template (user: question, assistant: worked answer ending in "#### N").
# Usage: bash benchmarks/gsm8k_lora.sh [DATA_DIR] [OUTPUT]
#   STEPS=64 (default): 64 steps × 8 problems = 512 training problems, about 30 s a step on 2 CPU cores.
#   The base model's figure is kept in OUTPUT/base_eval.txt and reused when present (it does not change);
#   the training run goes to OUTPUT/run (replaced at each call: --overwrite).
set -euo pipefail
DATA=${1:-../shared/data/gsm8k}
OUT=${2:-out/gsm8k-lora}
STEPS=${STEPS:-64}
COLS=prompt=question,completion=answer
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"
head -n 200 "$DATA/test.jsonl" > "$OUT/test200.jsonl"
SECONDS=0
if [ ! -s "$OUT/base_eval.txt" ]; then
  peftkit eval --model smollm2-135m --task causal-lm --data "$OUT/test200.jsonl" --columns "$COLS" --prompt-format chat \
    --exact-match 200 --max-new-tokens 256 > "$OUT/base_eval.tmp" && mv "$OUT/base_eval.tmp" "$OUT/base_eval.txt"
  echo "base model evaluated in ${SECONDS} s"
fi
echo "base model:"; cat "$OUT/base_eval.txt"
peftkit train --model smollm2-135m --task causal-lm --method lora --r 16 --alpha 32 --target-modules all-linear \
  --data "$DATA/train.jsonl" --eval-data "$OUT/test200.jsonl" --columns "$COLS" --prompt-format chat --output "$OUT/run" --overwrite \
  --max-steps "$STEPS" --batch-size 8 --lr 1e-3 --warmup 0.05 --schedule cosine --max-length 512 --log-every 10 \
  --exact-match 200 --max-new-tokens 256
echo "total ${SECONDS} s"
