"""The CPU allocator of a training process: mimalloc (from PyPI: cmeel-mimalloc) instead of glibc's.

glibc's malloc serves a request above its mmap threshold with a fresh mapping that `free` unmaps,
and smaller ones from heaps that keep freed blocks. The threshold is dynamic: each freed mapping
raises it to that block's size (up to 32 MiB), so from a run's second step on, the MiB-sized
activations come from the heaps, where the reference forward's, the forward's and the backward's
blocks of different sizes fragment them. Measured on SmolLM2-135M LoRA, 2 x 600-token rows, the
same batch every step (docs/benchmarks.md): the peak resident set went from 2.6 GiB after step 1 to
4.5 GiB, for TRL as for dpokit. Fixing the threshold (mallopt) gave 3.1 GiB but steps 37% slower
(every large block page-faulted afresh); jemalloc 3.0 GiB, +22%; mimalloc 3.2 GiB, +8% (that
batch) to +15% (the benchmark's varied batches) per step in one-process A/B runs. dpokit uses
mimalloc: the least slowdown for the memory, and a peak the memory plan predicts within a few
percent (glibc's fragmentation varies more: docs/benchmarks.md). DPOKIT_MALLOC=default opts out.

An allocator is chosen when a process starts (LD_PRELOAD), so `dpokit train | sft | reward | rl |
demo` re-run themselves once with mimalloc preloaded (`dpokit.launch.maybe_preload_allocator`),
only on CPU machines (no NVIDIA device node), when the library is installed and DPOKIT_MALLOC is not
`default`. A Python program calling `train()` keeps its own allocator; `active()` says which one,
and the memory plan uses the matching fragmentation factor.

Imports the standard library only.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "cmeel-mimalloc"
LIBRARY = "cmeel.prefix/lib/libmimalloc.so"
ENV_SWITCH = "DPOKIT_MALLOC"  # "default": keep the C library's allocator


def library() -> Path | None:
    """The installed libmimalloc.so, or None."""
    try:
        path = Path(str(metadata.distribution(DISTRIBUTION).locate_file(LIBRARY)))
    except metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def active() -> str:
    """The allocator this process runs on: "mimalloc" (preloaded) or "glibc" (or the platform's)."""
    try:
        maps = Path("/proc/self/maps").read_text(encoding="ascii", errors="replace")
    except OSError:
        return "glibc" if sys.platform == "linux" else "system"
    return "mimalloc" if "libmimalloc" in maps else "glibc"


def preload_env(environ: dict[str, str] | os._Environ[str]) -> dict[str, str] | None:
    """`environ` with mimalloc added to LD_PRELOAD, or None when this process should keep its
    allocator: not Linux, DPOKIT_MALLOC=default, a GPU machine (CUDA's own allocator holds the
    tensors there; untested under a preloaded mimalloc), no library, or already preloaded."""
    if sys.platform != "linux" or environ.get(ENV_SWITCH) == "default" or os.path.exists("/dev/nvidiactl"):
        return None
    lib = library()
    preload = environ.get("LD_PRELOAD", "")
    if lib is None or "libmimalloc" in preload:
        return None
    return {**environ, "LD_PRELOAD": f"{lib}:{preload}" if preload else str(lib)}


def for_training() -> str:
    """The allocator a `dpokit train` started from this environment will run on."""
    return "mimalloc" if active() == "mimalloc" or preload_env(os.environ) is not None else active()
