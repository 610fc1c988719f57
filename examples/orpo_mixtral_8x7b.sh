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
# Layout: the fastest the estimator finds on one node, ranked by predicted time to train the recipe, among those
# leaving at least 4 GiB of each GPU free (`tools/estimate_memory.py --hf-config tools/configs/mixtral-8x7b.json
# --search --nodes 1 --max-length 2048 --micro-batch-size 1 --global-batch-size 32`): TP4 PP1 EP2 DP2, full
# recompute, the precision-aware optimizer with 50% of its state on the host. At exactly that layout (busiest
# rank: the only pipeline stage):
#     weights         11.25 GiB   gradients 22.50 GiB (fp32)   main params 10.88 GiB   Adam state 21.75 GiB
#     activations      0.74 GiB (rough)   NCCL 1.72 GiB (6 groups)   reserve 6.00 GiB   estimate 74.84 GiB,
#                     budgeted 75.20 of 80 GiB: 4.80 GiB free, fits
#     host            43.50 GiB per GPU, 348 GiB per node
#     step             4.12 s = compute 1.58 + TP 0.35 + EP 0.03 + EP wait 0.09 + GPU Adam 0.03 + host Adam 1.67
#                      + PCIe 0.36
#     recipe           0.76 h on 8 GPUs = 6.1 GPU-hours (0.949 pairs/s/GPU)
# Within 1% of it on one node: TP2 EP4 DP4 full recompute offload 0.55. More nodes are faster and, without host
# Adam, cheaper: 2 nodes TP4 EP4 DP4, no recompute, no offload, 0.18 h (2.9 GPU-hours): `sbatch -N 2 ...` with TP=4
# PP=1 EP=4 RECOMPUTE= OPTIMIZER_OFFLOAD=0. Predictions assume a matmul efficiency of 53% and data-sheet
# bandwidths (README, "Capacity planning"). With Transformer Engine, EXTRA_ARGS="--use-precision-aware-optimizer --exp-avg-dtype bf16
# --exp-avg-sq-dtype bf16 --main-grads-dtype bf16" with TP=8 PP=1 OPTIMIZER_OFFLOAD=0 also fits one node (fp32
# main params, bf16 moments and gradients, nothing on the host; 7.0 GiB free, 0.45 h).
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
export TP=${TP:-4} PP=${PP:-1} EP=${EP:-2}
export RECOMPUTE=${RECOMPUTE-full}
export OPTIMIZER_OFFLOAD=${OPTIMIZER_OFFLOAD:-0.5}
# sbatch runs a copy of this file from its spool folder; the repository is the installed package's.
export ORPO_REPO=${ORPO_REPO:-$("$PYTHON" -c 'import orpo_megatron, os; print(os.path.dirname(os.path.dirname(orpo_megatron.__file__)))')}
exec bash "$ORPO_REPO/examples/orpo_mixtral_8x22b.sh"
