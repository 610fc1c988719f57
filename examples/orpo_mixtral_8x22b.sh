#!/usr/bin/env bash
# ORPO on Mixtral-8x22B with SLURM: the alignment-handbook's zephyr-orpo-141b recipe on 4 nodes x 8 H100 (80 GB).
#
#   HF_DIR=/models/Mixtral-8x22B-v0.1 WANDB_PROJECT=orpo sbatch examples/orpo_mixtral_8x22b.sh
#
# Steps: convert the HF checkpoint to our layout-free format when CHECKPOINT does not exist yet (one process, in
# this batch shell) -> train with one task per GPU (`srun python -m orpo_megatron.train`; ranks, world size and
# the rendezvous come from SLURM's variables, no torchrun) -> optionally export to HF (EXPORT_HF=1).
#
# Defaults = the real job. Hyperparameters are the recipe's (recipes/zephyr-141b-A35b/orpo/config_full.yaml):
# beta 0.05, lr 5e-6, inverse_sqrt with 100 warmup steps, 3 epochs, max length 2048 / prompt 1792, 32 pairs per
# step (micro-batch 1), bf16, AdamW (weight decay 0, grad clip 1.0: the HF defaults it relied on), seed 42,
# the zephyr chat template, argilla/distilabel-capybara-dpo-7k-binarized (read from the local datasets cache:
# nothing is downloaded at run time; fetch it once with `datasets.load_dataset(NAME)` on a machine with network).
# The recipe used 4 nodes (32 H100) with FSDP and 8-bit Adam. The layout here is the fastest the estimator finds
# on those 4 nodes, ranked by predicted time to train the recipe:
#
#   python tools/estimate_memory.py --hf-config tools/configs/mixtral-8x22b.json --search --max-length 2048 \
#       --micro-batch-size 1 --global-batch-size 32        (fastest layout per node count, 1-8 nodes of 8 x 80 GB)
#   nodes TP PP EP DP recomp offload   GiB | step s  comp  comm  wait    DP optim | pairs/s/GPU  hours  GPU-h  x hb
#       2  4  2  2  2   full    0.85  75.3 |   8.85  2.69  0.56  0.37  0.00  5.23 |       0.219   1.65   26.4  1.60
#       4  8  4  1  1   full    0.15  74.8 |   2.73  1.31  0.59  0.34  0.00  0.50 |       0.329   0.55   17.5  2.42
#       7  8  7  1  1   none       0  69.3 |   1.12  0.57  0.23  0.29  0.00  0.03 |       0.402   0.26   14.3  2.95
#       8  8  1  8  8   none       0  67.4 |   0.89  0.45  0.28  0.13  0.01  0.02 |       0.418   0.22   13.8  3.07
#
# A layout fits when its budget leaves at least 4 GiB of the 80 free (allocator fragmentation, cuDNN/cuBLAS
# workspaces), after a 6 GiB reserve (CUDA context, temporaries) and NCCL's buffers (294 MiB per process group).
# Default (4 nodes): TP8 PP4 EP1 DP1, full recompute, the precision-aware optimizer with 15% of its state on the
# hosts; `estimate_memory.py ... --tp 8 --pp 4 --ep 1 --dp 1 --recompute-granularity full
# --use-precision-aware-optimizer --optimizer-cpu-offload --optimizer-offload-fraction 0.15` (busiest rank, stage 0):
#     weights          8.21 GiB   gradients 16.42 GiB (fp32)   main params 13.96 GiB   Adam state 27.92 GiB
#     activations      0.58 GiB (rough)   NCCL 1.44 GiB (5 groups)   reserve 6.00 GiB   estimate 74.52 GiB,
#                      budgeted 74.81 of 80 GiB: 5.19 GiB free, fits
#     host             9.85 GiB per GPU, 79 GiB per node
#     step             2.73 s = compute 1.31 + TP 0.58 + bubble 0.34 + GPU Adam 0.04 + host Adam 0.38 + PCIe 0.08
#     recipe           0.55 h on 32 GPUs = 17.5 GPU-hours (0.329 pairs/s/GPU, 2.42x the handbook's 0.136 pairs/s/GPU,
#                      which took 1.33 h on 32 H100)
# Faster with more nodes than the recipe: 8 nodes, TP8 EP8 DP8, no recompute, no offload, 0.22 h and also fewer
# GPU-hours (13.8): `sbatch -N 8 ...` with TP=8 PP=1 EP=8 RECOMPUTE= OPTIMIZER_OFFLOAD=0. The fewest nodes that fit
# is 2: TP4 PP2 EP2 DP2 with offload 0.85 (1.65 h; most of each step is host Adam):
# `sbatch -N 2 ...` with TP=4 PP=2 EP=2 OPTIMIZER_OFFLOAD=0.85.
# Times are predictions at an assumed matmul efficiency of 53% and data-sheet bandwidths, on assumed capybara
# pair lengths packed into rows (README, "Capacity planning"); calibrate with the GPU acceptance command's
# measured throughput.
# Offloading needs the precision-aware optimizer, which the script passes with OPTIMIZER_OFFLOAD: without it
# Megatron-Core keeps every fp32 main param on the GPU.
#
# Every default can be changed with an environment variable (sbatch passes the submitting environment on), so
# the same script runs a tiny model on a small cluster. #SBATCH lines cannot read variables: override them on
# the command line, which wins over the lines below, e.g.
#   sbatch -N 1 --ntasks-per-node 8 --gpus-per-node 8 -c 1 --time 00:20:00 examples/orpo_mixtral_8x22b.sh
# The world size is SLURM_NTASKS; DP = world / (TP x PP).
#
#   HF_DIR            HF Mixtral folder (config.json + safetensors + tokenizer); needed only to convert
#   CHECKPOINT        converted checkpoint (default $RUN_DIR/converted); created from HF_DIR when missing
#   CONVERT_DTYPE     dtype of the converted weights (default bf16)
#   RUN_DIR           where everything of this run goes (default ./runs/orpo-mixtral-8x22b)
#   SAVE_DIR          training checkpoints + metrics.jsonl (default $RUN_DIR/train); a SAVE_DIR holding a
#                     checkpoint is resumed from its newest complete iteration (this is how a requeue continues)
#   DATA_PATH         preference data: a file/folder or a Hub name in the local cache (default: capybara 7k)
#   CHAT_TEMPLATE     zephyr (the recipe's) | mistral | chatml | a jinja file | "" = the tokenizer's own
#   TP PP EP VP       parallel layout (default 8 4 1 -); VP = virtual pipeline chunks per stage
#   BF16=1            bf16 training (0: fp32, which with Transformer Engine needs EXTRA_ARGS=--no-packing: TE
#                     attends packed rows only in bf16);  FP8=e4m3|hybrid: FP8 matmuls via TE (default off)
#   RECOMPUTE         activation recomputation: full | selective | "" (default full)
#   OPTIMIZER_OFFLOAD fraction of the optimizer state on the host (default 0.15; 0: all on the GPU); with it the
#                     precision-aware optimizer is on (bf16 only)
#   EPOCHS / TRAIN_ITERS  training length (default 3 epochs; TRAIN_ITERS wins when set)
#   GLOBAL_BATCH MICRO_BATCH MAX_LENGTH MAX_PROMPT_LENGTH LR WARMUP LR_DECAY_STYLE BETA SEED
#   EVAL_FRACTION     held-out fraction of the training pairs for eval/ metrics (default 0: the recipe trains on all)
#   SAVE_INTERVAL KEEP_LAST EVAL_INTERVAL LOG_INTERVAL DATA_WORKERS
#   ASYNC_SAVE        1: write checkpoints in the background (--async-save; each GPU's share of the ~2 TB is
#                     copied to host memory first, ~250 GB per 8-GPU node at 8 nodes); 0: in place (default 1)
#   EXIT_MARGIN_MINS  minutes before the time limit at which the trainer saves and stops (default 15)
#   WANDB_PROJECT WANDB_EXP_NAME (WANDB_MODE=offline is honoured)   EXTRA_ARGS  more trainer flags, word-split
#   EXPORT_HF=1       export the trained weights to HF format at the end (to EXPORT_DIR, default $RUN_DIR/hf)
#   PYTHON            interpreter with orpo_megatron installed (default python);  ORPO_REPO  the repository
#
# Time limit and requeue: `--signal=B:USR1@900` sends USR1 to this batch shell 15 minutes before the limit (room
# for the current step and a full save with optimizer state). The trap below forwards it to the srun step, srun
# forwards it to every task, and the trainer (its StopSignal) finishes the step, saves a checkpoint and exits 3
# (stopped early, checkpoint saved; 4 would mean nothing saved); the shell then requeues the job (`--requeue`
# allows it) and the next run resumes from SAVE_DIR. B: is used rather than signalling the tasks directly so that
# this shell knows the stop was a time-limit one. The trainer also gets --exit-duration-in-mins (the time left
# less EXIT_MARGIN_MINS), so it stops and is requeued the same way if the warning is lost. SIGTERM (scancel, or
# the limit itself) is forwarded too, so the tasks still save, but the job then ends with status 3 and no requeue. Only a trainer that trained to the end
# (status 0) goes on to the export.
# `--open-mode=append` keeps the output of every requeued run in one file.
#
#SBATCH --job-name=orpo-mixtral-8x22b
#SBATCH --nodes=4
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

PYTHON=${PYTHON:-python}
if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "error: submit this script with sbatch (or run it inside an salloc allocation)" >&2
    exit 1
fi
# sbatch runs a copy of this file from its spool folder; the repository (for tools/) is the installed package's.
ORPO_REPO=${ORPO_REPO:-$("$PYTHON" -c 'import orpo_megatron, os; print(os.path.dirname(os.path.dirname(orpo_megatron.__file__)))')}
if [ ! -f "$ORPO_REPO/tools/convert_hf.py" ]; then
    echo "error: $ORPO_REPO/tools/convert_hf.py not found; set ORPO_REPO to the orpo-megatron checkout" >&2
    exit 1
fi

RUN_DIR=${RUN_DIR:-$PWD/runs/orpo-mixtral-8x22b}
HF_DIR=${HF_DIR:-}
CHECKPOINT=${CHECKPOINT:-$RUN_DIR/converted}
CONVERT_DTYPE=${CONVERT_DTYPE:-bf16}
SAVE_DIR=${SAVE_DIR:-$RUN_DIR/train}
DATA_PATH=${DATA_PATH:-argilla/distilabel-capybara-dpo-7k-binarized}
CHAT_TEMPLATE=${CHAT_TEMPLATE-zephyr}
TP=${TP:-8}
PP=${PP:-4}
EP=${EP:-1}
VP=${VP:-}
BF16=${BF16:-1}
FP8=${FP8:-}
RECOMPUTE=${RECOMPUTE-full}
OPTIMIZER_OFFLOAD=${OPTIMIZER_OFFLOAD:-0.15}
EPOCHS=${EPOCHS:-3}
TRAIN_ITERS=${TRAIN_ITERS:-}
GLOBAL_BATCH=${GLOBAL_BATCH:-32}
MICRO_BATCH=${MICRO_BATCH:-1}
MAX_LENGTH=${MAX_LENGTH:-2048}
MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-1792}
LR=${LR:-5e-6}
WARMUP=${WARMUP:-100}
LR_DECAY_STYLE=${LR_DECAY_STYLE:-inverse-square-root}
BETA=${BETA:-0.05}
SEED=${SEED:-42}
EVAL_FRACTION=${EVAL_FRACTION:-0}
EVAL_INTERVAL=${EVAL_INTERVAL:-100}
SAVE_INTERVAL=${SAVE_INTERVAL-100}
KEEP_LAST=${KEEP_LAST-2}
ASYNC_SAVE=${ASYNC_SAVE:-1}
LOG_INTERVAL=${LOG_INTERVAL:-10}
DATA_WORKERS=${DATA_WORKERS:-8}
WANDB_PROJECT=${WANDB_PROJECT:-}
WANDB_EXP_NAME=${WANDB_EXP_NAME:-}
EXTRA_ARGS=${EXTRA_ARGS:-}
EXPORT_HF=${EXPORT_HF:-0}
EXPORT_DIR=${EXPORT_DIR:-$RUN_DIR/hf}
# CPU-side work per task (offloaded Adam, data) gets the CPUs SLURM gave the task: srun is told the count (since
# Slurm 22.05 it does not inherit --cpus-per-task), binds each task to its own cores, and OpenMP uses them all.
CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$CPUS_PER_TASK}
# One hardware queue per GPU: Megatron-Core then overlaps tensor-parallel communication with compute (Megatron-LM
# and the trainer refuse TP > 1 without it before Blackwell).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# The rendezvous host: the first of this job's nodes, by SLURM's own expansion of the node list (names such as
# node[01-04]-ib or rack[1-2]-gpu[01-08] included), not one exported from the submitting shell. srun passes it
# on to every task.
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)

REQUEUE=0
TERMINATED=0
TRAIN_PID=
on_signal() {  # $1: USR1 (time-limit warning: save, exit, requeue) or TERM (save, exit)
    [ "$1" = USR1 ] && REQUEUE=1
    [ "$1" = TERM ] && TERMINATED=1
    echo "$(date '+%F %T') batch shell got SIG$1${TRAIN_PID:+: the trainer saves a checkpoint and exits}"
    [ -z "$TRAIN_PID" ] || kill -s "$1" "$TRAIN_PID" 2>/dev/null || true
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

WORLD=${SLURM_NTASKS:?SLURM_NTASKS is not set}
echo "$(date '+%F %T') job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}:" \
     "$WORLD tasks, TP=$TP PP=$PP${VP:+ VP=$VP} EP=$EP DP=$(( WORLD / (TP * PP) )), rendezvous on $MASTER_ADDR"

# 1. Convert once. The converter writes into a staging folder and renames it when complete, so an existing
#    CHECKPOINT is always a whole one.
if [ ! -d "$CHECKPOINT" ]; then
    if [ -z "$HF_DIR" ] || [ ! -f "$HF_DIR/config.json" ]; then
        echo "error: CHECKPOINT=$CHECKPOINT does not exist and HF_DIR='$HF_DIR' is not an HF model folder" \
             "(config.json + safetensors) to convert it from" >&2
        exit 1
    fi
    echo "$(date '+%F %T') converting $HF_DIR -> $CHECKPOINT"
    "$PYTHON" "$ORPO_REPO/tools/convert_hf.py" hf-to-megatron --hf-dir "$HF_DIR" --output "$CHECKPOINT" \
        --dtype "$CONVERT_DTYPE"
fi

# 2. Train.
ARGS=(
    --load "$CHECKPOINT" --save "$SAVE_DIR"
    --data-path "$DATA_PATH" --max-length "$MAX_LENGTH" --max-prompt-length "$MAX_PROMPT_LENGTH"
    --data-num-workers "$DATA_WORKERS"
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --expert-model-parallel-size "$EP"
    --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH"
    --beta "$BETA" --lr "$LR" --lr-decay-style "$LR_DECAY_STYLE" --lr-warmup-iters "$WARMUP"
    --optimizer adam --weight-decay 0 --clip-grad 1.0 --seed "$SEED"
    --log-interval "$LOG_INTERVAL" --eval-interval "$EVAL_INTERVAL"
)
[ -n "$TRAIN_ITERS" ] && ARGS+=(--train-iters "$TRAIN_ITERS") || ARGS+=(--train-epochs "$EPOCHS")
[ -n "$CHAT_TEMPLATE" ] && ARGS+=(--chat-template "$CHAT_TEMPLATE")
[ -n "$SAVE_INTERVAL" ] && ARGS+=(--save-interval "$SAVE_INTERVAL")
[ -n "$KEEP_LAST" ] && ARGS+=(--keep-last-checkpoints "$KEEP_LAST")
[ "$ASYNC_SAVE" = 1 ] && ARGS+=(--async-save)
[ -n "$VP" ] && ARGS+=(--virtual-pipeline-model-parallel-size "$VP")
if [ "$BF16" = 1 ]; then ARGS+=(--bf16); else ARGS+=(--no-bf16); fi
[ -n "$FP8" ] && ARGS+=(--fp8-format "$FP8")
[ -n "$RECOMPUTE" ] && ARGS+=(--recompute-granularity "$RECOMPUTE")
# Offloading needs the precision-aware optimizer (otherwise the fp32 main params stay on the GPU).
[ "$OPTIMIZER_OFFLOAD" != 0 ] && ARGS+=(--use-precision-aware-optimizer --optimizer-cpu-offload
                                       --optimizer-offload-fraction "$OPTIMIZER_OFFLOAD")
[ "$EVAL_FRACTION" != 0 ] && ARGS+=(--eval-fraction "$EVAL_FRACTION")
[ -n "$WANDB_PROJECT" ] && ARGS+=(--wandb-project "$WANDB_PROJECT")
[ -n "$WANDB_EXP_NAME" ] && ARGS+=(--wandb-exp-name "$WANDB_EXP_NAME")
# Stop before the time limit even if the USR1 warning never comes: --exit-duration-in-mins is the job's time left
# at launch (squeue's %L: [D-][HH:]MM:SS) less EXIT_MARGIN_MINS, room for a step and a save (default 15, as
# the warning). A trainer stopped that way exits 3 like one stopped by USR1, and the job is requeued the same way.
EXIT_MARGIN_MINS=${EXIT_MARGIN_MINS:-15}
TIME_LEFT=$(squeue -h -j "$SLURM_JOB_ID" -o %L 2>/dev/null || true)
if [[ $TIME_LEFT =~ ^(([0-9]+)-)?(([0-9]+):)?([0-9]+):([0-9]+)$ ]]; then
    MINUTES_LEFT=$(( 10#${BASH_REMATCH[2]:-0} * 1440 + 10#${BASH_REMATCH[4]:-0} * 60 + 10#${BASH_REMATCH[5]} ))
    if (( MINUTES_LEFT > EXIT_MARGIN_MINS )); then
        ARGS+=(--exit-duration-in-mins $(( MINUTES_LEFT - EXIT_MARGIN_MINS )))
    fi
fi
# shellcheck disable=SC2206  # EXTRA_ARGS is a word-split list of flags by design
ARGS+=($EXTRA_ARGS)

if [ "$REQUEUE" = 1 ]; then  # the warning came during the conversion
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
SRUN=(srun --kill-on-bad-exit=1 --cpus-per-task="$CPUS_PER_TASK" --cpu-bind=cores)
echo "$(date '+%F %T') ${SRUN[*]} $PYTHON -m orpo_megatron.train ${ARGS[*]}"
"${SRUN[@]}" "$PYTHON" -m orpo_megatron.train "${ARGS[@]}" &
TRAIN_PID=$!
# A trapped signal interrupts `wait` (status > 128) while srun still runs: wait again for its real exit status.
while :; do
    wait "$TRAIN_PID" && status=0 || status=$?
    if [ "$status" -gt 128 ] && kill -0 "$TRAIN_PID" 2>/dev/null; then continue; fi
    break
done
trap - USR1 TERM
EXIT_STOPPED_SAVED=3  # the trainer's status for "stopped early, checkpoint saved" (python -m orpo_megatron.train --help)
# Stopped by the time-limit warning or by --exit-duration-in-mins (not by scancel's TERM): continue in a new run.
if [ "$status" = "$EXIT_STOPPED_SAVED" ] && [ "$TERMINATED" = 0 ]; then
    echo "$(date '+%F %T') stopped before the time limit; requeueing job $SLURM_JOB_ID to resume from $SAVE_DIR"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
if [ "$status" -ne 0 ]; then
    if [ "$status" = "$EXIT_STOPPED_SAVED" ]; then
        echo "$(date '+%F %T') trainer stopped early by SIGTERM; a checkpoint is in $SAVE_DIR (submit again to" \
             "resume); no export" >&2
    else
        echo "$(date '+%F %T') trainer exited with status $status; no export" >&2
    fi
    exit "$status"
fi

# 3. Optional export of the newest checkpoint to HF format.
if [ "$EXPORT_HF" = 1 ]; then
    echo "$(date '+%F %T') exporting $SAVE_DIR -> $EXPORT_DIR"
    "$PYTHON" "$ORPO_REPO/tools/convert_hf.py" megatron-to-hf --load "$SAVE_DIR" --output "$EXPORT_DIR" --overwrite
fi
echo "$(date '+%F %T') done"
