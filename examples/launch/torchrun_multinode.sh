#!/usr/bin/env bash
# HALO on several nodes with torchrun: a Qwen3-8B teacher distilled into a HypeNet student with
# TP=4 x PP=2 (one model replica per 8 GPUs), data parallel over the rest, megatron-core's
# distributed optimizer, bf16. Run the same command on every node, each with its NODE_RANK:
#
#   MASTER_ADDR=node0 NNODES=2 NODE_RANK=0 GPUS_PER_NODE=8 \
#   TEACHER_HF=/models/Qwen3-8B DATA=/data/fineweb_text_document WORK=/shared/runs/qwen3-8b \
#       bash examples/launch/torchrun_multinode.sh
#
# WORK must be on a filesystem every node sees (checkpoints are written by all ranks). Stages
# already finished in WORK are skipped by the trainer's resume; a stopped stage continues.
# DRY_RUN=1 prints the commands instead of running them (tests/test_launch.py checks them).
# Fit a layout to memory first: python tools/estimate_memory.py --model qwen3-8b --search --gpus 16 ...
set -euo pipefail

: "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
: "${TEACHER_HF:?set TEACHER_HF to the Qwen3 teacher folder (config.json, *.safetensors, tokenizer)}"
: "${DATA:?set DATA to the indexed dataset prefix made by tools/preprocess_data.py}"
: "${WORK:?set WORK to a shared folder for checkpoints}"
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}
TP=${TP:-4}
PP=${PP:-2}
CP=${CP:-1}
STAGES=${STAGES:-"align select distill finetune"}
SEQ=${SEQ:-4096}                  # align and distill
FINETUNE_SEQ=${FINETUNE_SEQ:-16384}
FINETUNE_CP=${FINETUNE_CP:-2}     # the longer finetune sequence is split over 2 context-parallel ranks
GLOBAL_BATCH=${GLOBAL_BATCH:-64}  # sequences per step (micro batch 1 x accumulation x data parallel)
NUM_ATTENTION_LAYERS=${NUM_ATTENTION_LAYERS:-4}  # 1/8 of Qwen3-8B's 36 layers, rounded

# Multicast NVLink (NVLS) can take a shared host's GPUs down: off in every process.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} WANDB_MODE=${WANDB_MODE:-offline}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CK=$WORK/checkpoints

# Pre-emption: SIGUSR1 (Slurm's --signal) or SIGTERM (Kubernetes, Slurm at the time limit) to this
# script is passed on as SIGUSR1 to the stage's trainers, which save a checkpoint and exit; the script
# then stops with PREEMPTED (143, a retryable code for the PyTorchJob's ExitCode restart policy and
# halo.sbatch's cue to requeue) instead of starting the next stage. torchrun runs in its own process
# group with SIGUSR1 ignored, so only the trainers react.
PREEMPTED=143
preempted=0
child=
on_signal() {
  preempted=1
  if [[ -n "$child" ]]; then kill -USR1 -- "-$child" 2>/dev/null || true; fi
}
trap on_signal USR1 TERM

run() {  # prints under DRY_RUN, runs otherwise
  if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

hypenet() {  # one stage on all nodes: torchrun flags, then pretrain_hypenet.py flags
  local cmd=(torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE"
             --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" "$REPO/pretrain_hypenet.py" "$@")
  if [[ -n "${DRY_RUN:-}" ]]; then run "${cmd[@]}"; return; fi
  setsid bash -c 'trap "" USR1; exec "$@"' torchrun "${cmd[@]}" &
  child=$!
  local rc=0
  wait "$child" || rc=$?
  while kill -0 "$child" 2>/dev/null; do rc=0; wait "$child" || rc=$?; done  # a signal interrupted the wait
  child=
  if [[ $preempted == 1 ]]; then echo "pre-empted: stage checkpoint saved, stopping" >&2; exit "$PREEMPTED"; fi
  if [[ $rc != 0 ]]; then exit "$rc"; fi
}

COMMON=(--data-path "$DATA" --tokenizer "$TEACHER_HF" --bf16 --micro-batch-size 1
        --global-batch-size "$GLOBAL_BATCH" --save-interval 250 --log-interval 10 --no-progress
        --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --sequence-parallel
        --use-distributed-optimizer)

# The teacher in Megatron format, once (node 0 converts, the others wait for the finished checkpoint).
if [[ ! -e "$CK/teacher/latest_checkpointed_iteration.txt" ]]; then
  if [[ "$NODE_RANK" == 0 ]]; then
    run python "$REPO/tools/convert_hf_to_mcore.py" --hf-dir "$TEACHER_HF" --out "$CK/teacher" --tp "$TP" --pp "$PP"
  elif [[ -z "${DRY_RUN:-}" ]]; then
    until [[ -e "$CK/teacher/latest_checkpointed_iteration.txt" ]]; do sleep 10; done
  fi
fi

for stage in $STAGES; do
  case $stage in
    align)
      hypenet --stage align --teacher "$CK/teacher" --save "$CK/align" "${COMMON[@]}" \
        --context-parallel-size "$CP" --seq-length "$SEQ" --train-iters 500 --lr 1e-3 --lr-warmup-iters 50 ;;
    select)  # trains nothing: scores each layer on retrieval and held-out loss, writes layer_pattern.txt
      hypenet --stage select --teacher "$CK/teacher" --load "$CK/align" --save "$CK/select" \
        --data-path "$DATA" --tokenizer "$TEACHER_HF" --bf16 --tensor-model-parallel-size "$TP" \
        --seq-length "$SEQ" --num-attention-layers "$NUM_ATTENTION_LAYERS" --no-progress ;;
    distill)
      hypenet --stage distill --teacher "$CK/teacher" --load "$CK/align" \
        --layer-pattern "$CK/select/layer_pattern.txt" --save "$CK/distill" "${COMMON[@]}" \
        --context-parallel-size "$CP" --seq-length "$SEQ" --train-iters 4000 --lr 1e-4 --lr-warmup-iters 100 ;;
    finetune)
      hypenet --stage finetune --load "$CK/distill" --save "$CK/finetune" "${COMMON[@]}" \
        --context-parallel-size "$FINETUNE_CP" --seq-length "$FINETUNE_SEQ" --train-iters 1000 --lr 3e-5 \
        --recompute-granularity full --recompute-method uniform --recompute-num-layers 1 ;;
    *) echo "unknown stage '$stage' in STAGES (align select distill finetune)" >&2; exit 2 ;;
  esac
done

if [[ "$NODE_RANK" == 0 && " $STAGES " == *" finetune "* ]]; then
  run python "$REPO/tools/convert_mcore_to_hf.py" --mcore-dir "$CK/finetune" --out "$WORK/hf_hypenet" --overwrite
fi
