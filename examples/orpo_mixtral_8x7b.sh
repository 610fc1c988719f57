#!/usr/bin/env bash
# ORPO on Mixtral-8x7B with SLURM: the same recipe and job as examples/orpo_mixtral_8x22b.sh (read it for every
# knob and for the signal/requeue handling) on ONE node of 8 H100 (80 GB).
#
#   HF_DIR=/models/Mixtral-8x7B-v0.1 WANDB_PROJECT=orpo sbatch examples/orpo_mixtral_8x7b.sh
#
# sbatch reads #SBATCH lines only from the submitted file, so this file carries its own (one node); it then sets
# the 8x7B defaults (each still overridable from the environment) and execs the 8x22B script, which keeps this
# batch shell's PID, so the time-limit USR1 reaches its trap.
#
# Layout (tools/estimate_memory.py --hf-config tools/configs/mixtral-8x7b.json --tp 8 --pp 1 --ep 1 --dp 1
#         --micro-batch-size 1 --max-length 2048 --global-batch-size 32 --recompute-granularity full
#         --use-precision-aware-optimizer --optimizer-cpu-offload --optimizer-offload-fraction 0.5):
#   layout: TP8 PP1 EP1 ETP8 DP1 (world 8, expert-DP 1); micro-batch 1 pair(s) = 2 x 2048 tokens; bf16; full
#           recompute; optimizer: offload 0.5 to the host (precision-aware, fp32 copies)
#     weights         10.88 GiB   2 B/param in DDP's param buffer (replicated over DP)
#     gradients       21.75 GiB   4 B/param grad buffer (replicated over DP)
#     main params     10.88 GiB   2 B/param of the optimizer shard on the GPU (fp32 copies of the half kept there)
#     optim. state    21.75 GiB   4 B/param of the same shard: Adam moments of that half
#     activations      0.46 GiB   rough: in-flight micro-batches x layers x per-layer formula + logits
#     reserve          6.00 GiB   CUDA context, NCCL, temporaries, fragmentation
#     estimate        71.73 GiB
#     budgeted        71.96 GiB   activations x 1.5; of 80 GiB: fits
#     host            43.51 GiB per GPU (8 B/param: the other half's fp32 main params, moments, gradient copy),
#                     348 GiB per 8-GPU node of 2000 GiB: fits
# Without the precision-aware optimizer (which OPTIMIZER_OFFLOAD turns on) all fp32 main params would stay on the
# GPU: +10.9 GiB, 82.6 GiB, over 80. `estimate_memory.py --search` finds 1 node the fewest; its pick there is this
# layout with offload 0.4 (78.5 of 80 GiB budgeted); 0.5 keeps ~8 GiB of headroom for the rough activation figure.
# With Transformer Engine, EXTRA_ARGS="--use-precision-aware-optimizer --exp-avg-dtype bf16 --exp-avg-sq-dtype bf16"
# and OPTIMIZER_OFFLOAD=0 also fits (71.7 GiB: bf16 moments and 2 B/param main params, nothing on the host).
#
#SBATCH --job-name=orpo-mixtral-8x7b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=08:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@900
#SBATCH --requeue
set -euo pipefail

export PYTHON=${PYTHON:-python}
export RUN_DIR=${RUN_DIR:-$PWD/runs/orpo-mixtral-8x7b}
export TP=${TP:-8} PP=${PP:-1} EP=${EP:-1}
export RECOMPUTE=${RECOMPUTE-full}
export OPTIMIZER_OFFLOAD=${OPTIMIZER_OFFLOAD:-0.5}
# sbatch runs a copy of this file from its spool folder; the repository is the installed package's.
export ORPO_REPO=${ORPO_REPO:-$("$PYTHON" -c 'import orpo_megatron, os; print(os.path.dirname(os.path.dirname(orpo_megatron.__file__)))')}
exec bash "$ORPO_REPO/examples/orpo_mixtral_8x22b.sh"
