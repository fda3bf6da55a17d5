#!/bin/bash
# Equal work, equal result: for each objective and strategy, one process (micro_batch 8) against two
# processes (micro_batch 4, or 2 x 2 accumulation steps) at the same global batch, tiny model, fp32,
# 8 steps with evaluation; prints bench/diff_runs.py for each pair (~4 min on 2 CPU cores).
#   bash bench/equal_work.sh          (the ZeRO rows need DeepSpeed: make deepspeed)
cd "$(dirname "$0")/.."
D=$(mktemp -d "${TMPDIR:-/tmp}/dpokit-equal.XXXXXX")
C="train.max_steps=8 train.log_every=1 train.mixed_precision=no train.eval_every=4 data.eval_files=[builtin:toy/eval.jsonl]"
run() { # name cmd preset strategy extra...
  local name=$1 cmd=$2 preset=$3 strat=$4; shift 4
  .venv/bin/python -m dpokit $cmd --preset $preset train.output_dir=$D/$name-one train.micro_batch_size=8 $C "$@" > $D/$name-one.log 2>&1 || echo "$name one FAILED"
  .venv/bin/python -m dpokit $cmd --preset $preset --num-processes 2 --accelerate-config $strat train.output_dir=$D/$name-two train.micro_batch_size=4 $C "$@" $TWO > $D/$name-two.log 2>&1 || echo "$name two FAILED"
  echo "$name ($cmd, $strat): $(.venv/bin/python bench/diff_runs.py $D/$name-one $D/$name-two)"
}
run dpo-full-ddp train tiny ddp
run dpo-full-fsdp train tiny fsdp
run dpo-lora-ddp train tiny ddp lora.enabled=true lora.r=4 train.lr=1e-2
run dpo-lora-fsdp train tiny fsdp lora.enabled=true lora.r=4 train.lr=1e-2
run dpo-packing-fsdp train tiny fsdp data.packing=true data.prefix_sharing=false
run dpo-precompute-ddp train tiny ddp reference.precompute=true
run sft-ddp sft sft-tiny ddp
TWO="train.grad_accum_steps=2 train.micro_batch_size=2" run sft-fsdp-accum2 sft sft-tiny fsdp
run reward-fsdp reward reward-tiny fsdp
run reward-ddp reward reward-tiny ddp
if .venv/bin/python -c "import deepspeed" 2>/dev/null; then
  TWO="train.grad_accum_steps=2 train.micro_batch_size=2" run dpo-zero2-accum2 train tiny zero2
  TWO="train.grad_accum_steps=2 train.micro_batch_size=2" run dpo-zero3-accum2 train tiny zero3
fi
