"""A fork server for tests that run the dpokit CLI in many short-lived processes (fault injection:
a SIGKILL must hit a real process, and each run must start from a fresh interpreter state).

`ForkServer()` starts ONE Python subprocess that imports dpokit's CLI, both training loops, torch
and transformers, runs no torch operation (so no thread pool exists yet), and then serves requests
read from its stdin, one JSON line each: ``{"argv", "fault", "log", "cwd", "timeout"}``. For each
it forks; the child starts its own process group, points fd 0 at /dev/null and fds 1 and 2 at the
log file, arms the fault (`dpokit.faults.arm`), runs ``dpokit.cli.main(argv)`` and leaves with
``os._exit(code)``. The server waits for it (killing its process group after the timeout) and
answers one JSON line: the exit status as `subprocess` reports it (negative signal number when
killed) and whether the timeout struck. Each run so costs the fork and the run, not the ~2 s of
imports of ``python -m dpokit``.

Test side::

    server = ForkServer()
    code, log = server.run(["train", ...], fault="step.optimizer#3", log=tmp_path / "run.log")
    server.close()

Run as ``python -m tests.integration.forkrun`` it is the server (from the repository root).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PYTHON = REPO / ".venv" / "bin" / "python"
# one thread everywhere: reproducible CPU float32 maths, and no oversubscription on small machines
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
_READY = "forkrun: ready"
_GRACE = 30.0  # seconds the test side waits beyond a run's timeout before it gives up on the server


class ForkServerError(RuntimeError):
    """The server died or stopped answering."""


class RunTimeout(AssertionError):
    """A run outlived its timeout (the server killed it)."""


class ForkServer:
    """The test side: one server process, `run` per CLI run, `close` at the end (or a `with` block)."""

    def __init__(self, env: dict[str, str] | None = None, start_timeout: float = 120.0) -> None:
        python = str(PYTHON) if PYTHON.is_file() else sys.executable
        full_env = {**os.environ, **ENV, **(env or {})}
        full_env.pop("DPOKIT_FAULT", None)  # faults are armed per run, never for the server's imports
        self.started = time.monotonic()
        self.errors = tempfile.TemporaryFile()  # the server's own stderr (a pipe nobody reads could fill up)
        self.proc = subprocess.Popen([python, "-m", "tests.integration.forkrun"], cwd=REPO, env=full_env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors)  # fmt: skip
        self.runs = 0
        line = self._readline(start_timeout)
        if not line.startswith(_READY):
            err = self._stderr()
            self.close()
            raise ForkServerError(f"the fork server did not start: {line!r}\n{err}")
        self.startup_s = time.monotonic() - self.started  # the imports, paid once
        self.threads = int(line.split()[-1])  # the server's threads when it forks: 1, or a warning
        if self.threads > 1:
            warnings.warn(f"forkrun: the server has {self.threads} threads before forking", stacklevel=2)

    def run(self, argv: list[str], fault: str = "", log: Path | str | None = None, cwd: Path | str | None = None,
            timeout: float = 300.0) -> tuple[int, str]:  # fmt: skip
        """Run ``dpokit.cli.main(argv)`` in a forked child with `fault` armed; its stdout and stderr go
        to `log` (appended). Returns (exit status, the log's text); the status is negative when a
        signal ended the child (-9: SIGKILL). A child still running after `timeout` seconds is killed
        and RunTimeout raised."""
        if self.proc.poll() is not None:
            raise ForkServerError(f"the fork server is gone (exit status {self.proc.returncode}): {self._stderr()}")
        log_path = Path(log) if log is not None else Path(os.devnull)
        request = {"argv": [str(a) for a in argv], "fault": fault, "log": str(log_path),
                   "cwd": str(cwd or REPO), "timeout": timeout}  # fmt: skip
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        line = self._readline(timeout + _GRACE)
        try:
            reply = json.loads(line)
        except ValueError:
            err = self._stderr()
            self.close()
            raise ForkServerError(f"the fork server answered {line!r}: {err}") from None
        self.runs += 1
        text = log_path.read_text(errors="replace") if log is not None and log_path.is_file() else ""
        if reply.get("error"):
            raise ForkServerError(f"the fork server could not run {argv}: {reply['error']}")
        if reply["timed_out"]:
            raise RunTimeout(f"dpokit {' '.join(request['argv'][:1])} (fault {fault!r}) still ran after {timeout} s "
                             f"and was killed; its log:\n{text[-4000:]}")  # fmt: skip
        return int(reply["code"]), text

    def _readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.close()
            raise ForkServerError(f"the fork server did not answer within {timeout:.0f} s")
        line = self.proc.stdout.readline().decode(errors="replace")
        if not line:
            err = self._stderr()
            self.close()
            raise ForkServerError(f"the fork server ended (exit status {self.proc.poll()}): {err}")
        return line

    def _stderr(self) -> str:
        if self.errors.closed:
            return ""
        self.errors.seek(0)
        return self.errors.read().decode(errors="replace")[-4000:]

    def close(self) -> None:
        """Stop the server: end of input lets it exit; it is killed if it does not within 10 s."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.errors):
            if stream is not None and not stream.closed:
                stream.close()

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---- the server ---------------------------------------------------------------------------------
def _serve() -> None:
    # The protocol gets private copies of fds 0 and 1; fd 1 then goes to stderr, so that nothing an
    # import prints can corrupt the answers.
    requests = os.fdopen(os.dup(0), "rb", buffering=0)
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)

    _preload()
    # a fork copies only the forking thread: a lock another thread held would stay locked in the child
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
    answers.write(f"{_READY} {threads}\n")
    for raw in iter(requests.readline, b""):
        try:
            request = json.loads(raw)
            code, timed_out = _fork_and_wait(request, [requests.fileno(), answers.fileno()])
            answer: dict[str, Any] = {"code": code, "timed_out": timed_out}
        except Exception as exc:  # a bad request: say so, keep serving
            answer = {"code": None, "timed_out": False, "error": f"{type(exc).__name__}: {exc}"}
        answers.write(json.dumps(answer) + "\n")


# What every run would otherwise import itself (transformers imports lazily: the Llama classes,
# the auto factories, generation, torch.distributed.tensor and sympy behind them; ~1.5 s a run).
_PRELOAD = ("torch", "transformers", "safetensors.torch", "tokenizers", "dpokit.cli", "dpokit.training.loop",
            "dpokit.rl.loop", "transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto",
            "transformers.models.llama.modeling_llama", "transformers.generation.utils")  # fmt: skip


def _preload() -> None:
    import importlib

    for name in _PRELOAD:
        importlib.import_module(name)
    from dpokit.cli import build_parser

    build_parser()  # the CLI's parser imports each command's module


def _fork_and_wait(request: dict[str, Any], private: list[int]) -> tuple[int, bool]:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        _child(request, private)
    deadline = time.monotonic() + float(request.get("timeout", 300))
    delay = 0.001
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), False
        if time.monotonic() > deadline:
            _kill_group(pid)
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status), True
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def _kill_group(pid: int) -> None:
    for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            kill()
        except ProcessLookupError:
            pass


def _die_with_the_server() -> None:
    """Linux: SIGKILL this child when the server dies (killed by the test side), not orphan it."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _child(request: dict[str, Any], private: list[int]) -> None:
    code = 1
    try:
        os.setpgid(0, 0)  # its own group: a timeout kills what it started too
        _die_with_the_server()
        for fd in private:
            os.close(fd)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        for stream in (sys.stdout, sys.stderr):  # what a SIGKILL cuts short is in the log, line by line
            stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        os.chdir(request["cwd"])
        from dpokit import faults
        from dpokit.cli import main

        faults.arm(request.get("fault", ""))
        code = main(list(request["argv"]))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(int(code) & 0xFF if isinstance(code, int) else 1)


if __name__ == "__main__":
    _serve()
