#!/usr/bin/env bash
# The README's demo: ORPO on a tiny random Mixtral with the bundled preference pairs, on CPU, in a few minutes.
#
#   bash examples/orpo_tiny.sh            (environment knobs: OUT, NPROC, TRAIN_ITERS, TP, PP, EP)
#
# Steps: write a tiny HF Mixtral + tokenizer -> convert to our checkpoint format -> train with torchrun
# (held-out evaluation before and after) -> export back to Hugging Face format -> plot the curves.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/tiny}
NPROC=${NPROC:-2}
TRAIN_ITERS=${TRAIN_ITERS:-200}
TP=${TP:-1}
PP=${PP:-1}
EP=${EP:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Megatron-LM's requirement for TP > 1 on a GPU (the trainer refuses to start without it there); unused on CPU.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

python tools/make_tiny_fixtures.py --output "$OUT/hf" --overwrite
python tools/convert_hf.py hf-to-megatron --hf-dir "$OUT/hf" --output "$OUT/converted" --dtype fp32 --overwrite
rm -rf "$OUT/train"   # a fresh run each time (a kept --save folder would resume)
python -m torch.distributed.run --nproc-per-node "$NPROC" -m orpo_megatron.train \
    --load "$OUT/converted" \
    --data-path examples/data/capybara_style.jsonl --eval-fraction 0.1 \
    --max-length 256 --max-prompt-length 192 \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --expert-model-parallel-size "$EP" \
    --micro-batch-size 4 --global-batch-size 8 --train-iters "$TRAIN_ITERS" \
    --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 10 --beta 0.1 \
    --log-interval 20 --eval-interval 50 --save "$OUT/train"
python tools/convert_hf.py megatron-to-hf --load "$OUT/train" --output "$OUT/hf-trained" --overwrite
python tools/plot_metrics.py "$OUT/train" --output "$OUT/train/metrics.png"
python - "$OUT/train/metrics.jsonl" <<'PY'
import json, sys
evals = [row for row in map(json.loads, open(sys.argv[1])) if "eval/rewards/accuracies" in row]
first, last = evals[0], evals[-1]
print(f"held-out rewards/accuracies: {first['eval/rewards/accuracies']:.3f} before training -> "
      f"{last['eval/rewards/accuracies']:.3f} after {last['iteration']} steps; "
      f"rewards/margins {first['eval/rewards/margins']:.4f} -> {last['eval/rewards/margins']:.4f}")
PY
