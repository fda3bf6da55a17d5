"""`dpokit train | sft | reward | kto --num-processes N`: the command re-runs itself under `accelerate launch`.

    dpokit train my.yaml --num-processes 2 --accelerate-config fsdp
    -> python -m accelerate.commands.launch --config_file .../assets/accelerate/fsdp.yaml
         --num_processes 2 --main_process_port PORT -m dpokit train my.yaml

The dpokit process starts the launcher and waits for it (`_supervise`): a SIGTERM sent to it is
passed on to the launcher, which forwards it to the workers (a Ctrl-C on the terminal reaches them
all directly). The workers see WORLD_SIZE (set by the launcher) and train; they never launch again
(DPOKIT_LAUNCH_FLAGS tells them the flags, for the "to continue" command). The exit status is the
main worker's own (`record_outcome`: 74 for a failed write, 128+N after signal N, 2 for an error),
not the launcher's generic 1; when the launcher reports a failure, the main worker's error line is
repeated last, below the launcher's report. `dpokit rl` stays in one process. Imports the standard
library, `dpokit.resources` and `dpokit.errors` only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile

from dpokit import allocator, resources
from dpokit.errors import ConfigError, DpokitError

NUM_PROCESSES_FLAG = "--num-processes"
ACCELERATE_CONFIG_FLAG = "--accelerate-config"
DEFAULT_ACCELERATE_CONFIG = "ddp"
_FLAGS = (NUM_PROCESSES_FLAG, ACCELERATE_CONFIG_FLAG)
# set for the workers of a relaunch: the launch flags they were started with (the "to continue" hint)
LAUNCH_FLAGS_ENV = "DPOKIT_LAUNCH_FLAGS"


def _launch_flag(arg: str) -> str | None:
    """The launch flag `arg` names (`--num-processes`, `--num-processes=2`, or an abbreviation argparse
    accepts, `--num 2`), else None."""
    name = arg.split("=", 1)[0]
    if len(name) < 3 or not name.startswith("--"):
        return None
    return next((flag for flag in _FLAGS if flag.startswith(name)), None)


def strip_launch_flags(argv: list[str]) -> list[str]:
    """argv without `--num-processes V` / `--accelerate-config V` (also `--flag=V`); the other
    arguments are kept as they are, in order. Nothing after a `--` is touched."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            out += argv[i:]
            break
        if _launch_flag(arg) is not None:
            i += 1 if "=" in arg else 2  # `--flag=V` is one token, `--flag V` two
            continue
        out.append(arg)
        i += 1
    return out


def relaunch_argv(argv: list[str], num_processes: int, accelerate_config: str, port: int) -> list[str]:
    """The `accelerate launch` command that runs `dpokit <argv>` in `num_processes` processes.
    `argv` is dpokit's own (subcommand first); `accelerate_config` a shipped name or a file path."""
    config = resources.accelerate_config_path(accelerate_config)
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(config),
        "--num_processes", str(num_processes),
        "--main_process_port", str(port),
        "-m", "dpokit", *strip_launch_flags(argv),
    ]  # fmt: skip


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for the launcher's rendezvous (two runs on one machine
    would otherwise both take Accelerate's default 29500)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_flags() -> list[str]:
    """In a worker of `--num-processes N`: the launch flags it was started with (to repeat them in a
    "to continue" command, since a checkpoint resumes with the same processes); else []."""
    return shlex.split(os.environ.get(LAUNCH_FLAGS_ENV, ""))


def is_main_process() -> bool:
    """Whether this process prints a command's closing line: the only one, or rank 0 of a launch."""
    return os.environ.get("RANK", "0") in ("", "0")


def maybe_preload_allocator(argv: list[str]) -> None:
    """Re-run `dpokit <argv>` once with mimalloc preloaded (`dpokit.allocator`: a CPU run's freed
    activations go back to the system); returns when there is nothing to do. Does not return when
    it re-runs: the process is replaced, before anything heavy was imported."""
    env = allocator.preload_env(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "dpokit", *argv], env)


def maybe_relaunch(command: str, argv: list[str], num_processes: int, accelerate_config: str | None) -> None:
    """Re-run `dpokit <argv>` under `accelerate launch` when more than one process is asked for and
    this process is not a launched worker already (WORLD_SIZE unset); returns when there is nothing
    to do (one process, or a worker). Does not return when it launches: it exits with the run's status."""
    if num_processes < 1:
        raise ConfigError(f"{NUM_PROCESSES_FLAG} must be >= 1 (got {num_processes})")
    if num_processes == 1:
        return
    if command == "rl":
        raise DpokitError(
            f"dpokit rl runs in one process ({NUM_PROCESSES_FLAG} {num_processes} given): PPO/RLOO's "
            "rollouts are not split across processes; DPO, SFT, reward models and KTO train on several "
            f"(`dpokit train | sft | reward | kto {NUM_PROCESSES_FLAG} N`)"
        )
    if "WORLD_SIZE" in os.environ:  # a worker that a launcher (this one, accelerate, torchrun) started
        return
    config = accelerate_config or DEFAULT_ACCELERATE_CONFIG
    cmd = relaunch_argv(argv, num_processes, config, free_port())
    flags = [NUM_PROCESSES_FLAG, str(num_processes)]
    flags += [ACCELERATE_CONFIG_FLAG, config] if config != DEFAULT_ACCELERATE_CONFIG else []
    print(f"dpokit {command}: launching {num_processes} processes: {shlex.join(cmd)}", flush=True)
    sys.stderr.flush()
    sys.exit(_supervise(cmd, {**os.environ, LAUNCH_FLAGS_ENV: shlex.join(flags)}))


def _supervise(cmd: list[str], env: dict[str, str]) -> int:
    """Run the launcher, pass SIGTERM on to it, and return the main worker's exit status."""
    fd, outcome = tempfile.mkstemp(prefix="dpokit-outcome-", suffix=".json")
    os.close(fd)
    proc = subprocess.Popen(cmd, env={**env, OUTCOME_ENV: outcome})
    # Ctrl-C reaches every process of the terminal's group by itself; passing it on again would count
    # as a second one (abort at once). A SIGTERM is sent to this process alone: pass it on.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    ignored = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code = proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, ignored)
    launcher = code if code >= 0 else 128 - code  # killed by a signal: the shell's number for it
    recorded = _read_outcome(outcome)
    if recorded is None or (launcher != 0 and not recorded.get("code")):  # another worker failed
        return launcher
    if launcher != 0 and recorded.get("message"):
        print(f"error: {recorded['message']}", file=sys.stderr, flush=True)
    return int(str(recorded["code"]))


def _read_outcome(path: str) -> dict[str, object] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


OUTCOME_ENV = "DPOKIT_OUTCOME"  # the file the main worker writes its exit status (and error) into


def record_outcome(code: int, message: str = "") -> None:
    """In the main worker of a `--num-processes` run: tell the supervising dpokit process how the run
    ended (its exit status and error line). No-op anywhere else."""
    path = os.environ.get(OUTCOME_ENV)
    if not path or not is_main_process():
        return
    with contextlib.suppress(OSError):
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"code": code, "message": message}, fh)
