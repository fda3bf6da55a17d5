"""The fault matrix: a run SIGKILLed at every named fault point (`dpokit.faults`), mid-step, mid-
checkpoint (a file cut to half, as if the kill came while writing it), before a checkpoint is
published, in the final save, before the completion marker, in a metrics row, and then resumed with
train.resume=auto, ends exactly like the uninterrupted run: the same final weights, bit for bit, the
same metrics.jsonl rows (wall-clock speeds aside), run_complete.json, and no staging leftovers.

Every run is a real process (a SIGKILL must kill one), forked from a server that imported torch and
dpokit once (`tests.integration.forkrun`): ~0.35 s a tiny run instead of ~4.5 s for `python -m dpokit`.

Default: every point for DPO (`DPO_POINTS`), one point each for SFT, reward, KTO and RL. Slow
(--runslow): the full list for SFT, reward, KTO and RL, and random kills of DPO runs (random
optimizer steps, random checkpoint files at random hits; DPOKIT_FAULT_SEED=N repeats a session's).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from dpokit import faults
from dpokit.training.checkpoint import CHECKPOINTS, folder_name, list_checkpoints, staging_dir
from dpokit.training.outputs import COMPLETE, FINAL_STAGING
from tests.conftest import PRESETS, TOY
from tests.integration.forkrun import ForkServer

STEPS, SAVE_EVERY, LOG_EVERY = 8, 3, 2  # checkpoints at 3, 6 and 8 (the last step is always saved)
CHECKPOINT_STEPS = (3, 6, 8)
WEIGHTS = "model.safetensors"
# the files of a one-process checkpoint, in the order they are written (checkpoint.file:<name>)
CHECKPOINT_FILES = ("rng-0.pt", WEIGHTS, "optimizer.pt", "scheduler.pt", "trainer_state.pt", "config.yaml",
                    "meta.json")  # fmt: skip
UPDATES_PER_STEP = {"rl": 4}  # optimizer steps per RL step: rl.ppo_epochs 2 x rl.num_minibatches 2 (rl-tiny)
KINDS = ("dpo", "sft", "reward", "kto", "rl")
TIMEOUT = 240.0  # seconds one run may take before it counts as hung
SEED = int(os.environ.get("DPOKIT_FAULT_SEED") or random.SystemRandom().randrange(10**6))
RANDOM_KILLS = 12


@dataclass(frozen=True)
class Kill:
    """One cell of the matrix: run `kind` with the fault `spec` armed; it must die by SIGKILL leaving
    `resumes_at` as its newest complete checkpoint (0: none), then resume to the reference's end."""

    kind: str
    spec: str
    resumes_at: int

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.spec}"

    @property
    def fault(self) -> faults.Fault:
        (fault,) = faults.parse(self.spec)
        return fault


def _optimizer_hit(kind: str, step: int) -> int:
    """The step.optimizer hit in the middle of optimizer step `step` of a `kind` run."""
    per_step = UPDATES_PER_STEP.get(kind, 1)
    return per_step * (step - 1) + (per_step + 1) // 2


def points(kind: str) -> list[Kill]:
    """Every named fault point of a run of `kind`, each struck where it leaves work to redo."""
    first = CHECKPOINT_STEPS[0]  # the checkpoint files and publish: of the 2nd checkpoint, so resume at the 1st
    return [
        Kill(kind, f"step.optimizer#{_optimizer_hit(kind, 5)}", first),  # inside step 5
        *(Kill(kind, f"checkpoint.file:{name}#2:torn", first) for name in CHECKPOINT_FILES),
        Kill(kind, "checkpoint.publish#2", first),
        Kill(kind, f"final.file:{WEIGHTS}:torn", STEPS),  # the final save: resumes from the last step's checkpoint
        Kill(kind, "final.publish", STEPS),
        Kill(kind, "final.marker", STEPS),
        Kill(kind, "metrics.write#2:torn", first),  # the row of step 4, cut in half (after checkpoint 3)
    ]


DPO_POINTS = points("dpo")
# one point for each other objective by default (their own reach sites, checkpoint and final layouts)
OTHER_DEFAULT = {"sft": "step.optimizer#5", "reward": f"final.file:{WEIGHTS}:torn", "kto": "metrics.write#2:torn",
                 "rl": f"step.optimizer#{_optimizer_hit('rl', 5)}"}  # fmt: skip
DEFAULT_POINTS = DPO_POINTS + [k for kind in KINDS[1:] for k in points(kind) if k.spec == OTHER_DEFAULT[kind]]
SLOW_POINTS = [k for kind in KINDS[1:] for k in points(kind) if k not in DEFAULT_POINTS]


def random_kill(i: int, seed: int = SEED) -> Kill:
    """The i-th random kill of a DPO run: a random optimizer step, or a random checkpoint file at a
    random checkpoint (killed or torn)."""
    rng = random.Random(f"{seed}-{i}")
    if rng.random() < 0.5:
        step = rng.randint(1, STEPS)
        return Kill("dpo", f"step.optimizer#{step}", max([0, *(s for s in CHECKPOINT_STEPS if s < step)]))
    hit = rng.randint(1, len(CHECKPOINT_STEPS))
    name, action = rng.choice(CHECKPOINT_FILES), rng.choice(("kill", "torn"))
    return Kill("dpo", f"checkpoint.file:{name}#{hit}:{action}", ([0, *CHECKPOINT_STEPS])[hit - 1])


# ---- runs -------------------------------------------------------------------------------------------
def _argv(kind: str, model_dir: Path, out: Path) -> list[str]:
    common = [f"model.name_or_path={model_dir}", f"train.output_dir={out}", f"train.max_steps={STEPS}",
              f"train.save_every={SAVE_EVERY}", f"train.log_every={LOG_EVERY}", "train.progress_bar=false"]  # fmt: skip
    if kind == "dpo":
        return ["train", str(PRESETS / "tiny.yaml"), *common, f"data.train_files=[{TOY / 'train.jsonl'}]",
                f"data.eval_files=[{TOY / 'eval.jsonl'}]", "train.eval_every=4"]  # fmt: skip
    if kind == "sft":
        return ["sft", "--preset", "sft-tiny", *common, "train.eval_every=4", "data.eval_files=[]",
                "data.eval_fraction=0.05"]  # fmt: skip
    if kind == "reward":
        evals = out.parent / "eval32.jsonl"  # a third of the toy eval pairs (as test_reward uses)
        if not evals.is_file():
            evals.write_text("".join((TOY / "eval.jsonl").read_text().splitlines(keepends=True)[:32]))
        return ["reward", "--preset", "reward-tiny", *common, f"data.train_files=[{TOY / 'train.jsonl'}]",
                f"data.eval_files=[{evals}]", "train.eval_every=4"]  # fmt: skip
    if kind == "kto":
        return ["kto", "--preset", "kto-tiny", *common, "train.eval_every=4"]
    if kind == "rl":
        return ["rl", "--preset", "rl-tiny", *common, "rl.prompts_per_step=4"]
    raise ValueError(kind)


@pytest.fixture(scope="module")
def server() -> Iterator[ForkServer]:
    with ForkServer() as s:
        yield s


@pytest.fixture(scope="module")
def references(server: ForkServer, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`references(kind)`: the output folder of an uninterrupted run of `kind` (run on first use)."""
    done: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in done:
            out = tmp_path_factory.mktemp(f"reference-{kind}") / "run"
            code, log = server.run(_argv(kind, tiny_model_dir, out), log=f"{out}.log", timeout=TIMEOUT)
            assert code == 0, log[-6000:]
            assert (out / COMPLETE).is_file() and (out / WEIGHTS).is_file(), log[-6000:]
            kept = [step for step, _ in list_checkpoints(out / CHECKPOINTS)]
            assert kept == list(CHECKPOINT_STEPS[-2:]), kept  # keep_checkpoints=2; the last step's is one
            files = sorted(p.name for p in (out / CHECKPOINTS / folder_name(STEPS)).iterdir())
            assert files == sorted(CHECKPOINT_FILES), f"the checkpoint files changed: update CHECKPOINT_FILES: {files}"
            steps = sorted({r["step"] for r in _rows(out)})
            assert steps == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY)), steps
            done[kind] = out
        return done[kind]

    return get


def _rows(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _timing(key: str) -> bool:
    """Wall-clock values, the only ones allowed to differ: tokens_per_sec (RL: *_per_sec, time/*)."""
    return key.endswith("tokens_per_sec") or key.startswith("time/")


def _same(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _leftovers(out: Path) -> list[str]:
    """Staging folders and temporary files a finished run must not leave behind."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if p.name.startswith((".tmp-", ".old-")) or (p.name.startswith(".") and p.name.endswith(".tmp")))  # fmt: skip


def _staged_by(kill: Kill, out: Path) -> Path | None:
    """What a kill at `kill`'s point leaves staged (SIGKILL: nothing cleans up): the file or staging
    folder of the checkpoint or final save it struck in."""
    point, hit = kill.fault.point, kill.fault.hit
    if point.startswith("checkpoint."):
        stage = staging_dir(out / CHECKPOINTS, CHECKPOINT_STEPS[hit - 1])
        return stage / point.partition(":")[2] if point.startswith("checkpoint.file:") else stage / "meta.json"
    if point.startswith("final.file:"):
        return out / FINAL_STAGING / point.partition(":")[2]
    return out / FINAL_STAGING if point == "final.publish" else None


def assert_killed(code: int, log: str, out: Path, kill: Kill, note: str = "") -> None:
    """The run died by the armed SIGKILL, before it finished: a fault that never struck (its HIT
    past the end of the run, a point that moved) fails here, loudly, instead of passing vacuously."""
    assert code == -signal.SIGKILL, (
        f"{kill.id}{note}: the fault never struck: the run ended with exit status {code}, not -SIGKILL "
        f"(is the HIT past the end of the run, or is the point no longer reached?)\n{log[-4000:]}"
    )
    assert not (out / COMPLETE).exists(), f"{kill.id}{note}: killed, yet {COMPLETE} was written"
    staged = _staged_by(kill, out)
    assert staged is None or staged.exists(), f"{kill.id}{note}: killed, but {staged} is not there\n{log[-4000:]}"
    newest = [step for step, _ in list_checkpoints(out / CHECKPOINTS)][-1:] or [0]
    assert newest == [kill.resumes_at], (
        f"{kill.id}{note}: the kill left checkpoint {newest[0]} as the newest, expected {kill.resumes_at}: "
        f"it struck elsewhere than planned\n{log[-4000:]}"
    )


def assert_same_run(got: Path, want: Path, what: str) -> None:
    a, b = load_file(str(got / WEIGHTS)), load_file(str(want / WEIGHTS))
    assert a.keys() == b.keys(), what
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: weights differ from the uninterrupted run: {differ[:5]}"
    rows_got, rows_want = _rows(got), _rows(want)
    assert [r["step"] for r in rows_got] == [r["step"] for r in rows_want], what
    for r, w in zip(rows_got, rows_want):
        assert r.keys() == w.keys(), (what, r, w)
        wrong = [(k, r[k], w[k]) for k in r if not _timing(k) and not _same(r[k], w[k])]
        assert not wrong, f"{what}: step {r['step']}: {wrong}"


def kill_and_resume(server: ForkServer, model_dir: Path, reference: Path, out: Path, kill: Kill,
                    note: str = "") -> None:  # fmt: skip
    argv = _argv(kill.kind, model_dir, out)
    code, log = server.run(argv, fault=kill.spec, log=f"{out}.kill.log", timeout=TIMEOUT)
    assert_killed(code, log, out, kill, note)
    staged = _staged_by(kill, out)
    if kill.fault.action == "torn" and staged is not None:  # cut to half of what was written: shorter than whole
        whole = reference / staged.relative_to(out)
        if staged.parent.name.startswith(".tmp-step-"):
            whole = reference / CHECKPOINTS / staged.parent.name.removeprefix(".tmp-") / staged.name
        if whole.is_file():  # (the reference keeps the last 2 checkpoints only)
            assert staged.stat().st_size < whole.stat().st_size, f"{kill.id}{note}: {staged} was not cut short"

    code, log = server.run([*argv, "train.resume=auto"], log=f"{out}.resume.log", timeout=TIMEOUT)
    assert code == 0, f"{kill.id}{note}: the resumed run failed\n{log[-6000:]}"
    checkpoint = out / CHECKPOINTS / folder_name(kill.resumes_at)
    said = f"resumed from {checkpoint}" if kill.resumes_at else "train.resume=auto: no checkpoint in"
    assert said in log, f"{kill.id}{note}: expected '{said}' in the resumed run's log\n{log[-6000:]}"
    if (kill.fault.point, kill.fault.action) == ("metrics.write", "torn") and kill.resumes_at:  # (else: a new file)
        assert "its last line was cut short" in log, f"{kill.id}: the torn metrics row was not repaired\n{log[-4000:]}"
    assert (out / COMPLETE).is_file(), f"{kill.id}{note}: no {COMPLETE} after the resumed run"
    assert not _leftovers(out), f"{kill.id}{note}: left over: {_leftovers(out)}"
    assert_same_run(out, reference, f"{kill.id}{note}")


# ---- tests -----------------------------------------------------------------------------------------
def test_the_matrix_names_every_fault_point() -> None:
    """A new fault point (or checkpoint file) must get a cell: every entry of faults.POINTS is struck
    by DPO_POINTS (checkpoint.file:sharded, of multi-process runs only, is not in this matrix)."""
    for point in faults.POINTS:
        assert any(k.spec.startswith(point) for k in DPO_POINTS), f"no cell for fault point {point}"
    assert {k.spec.split("#")[0] for k in DPO_POINTS if k.spec.startswith("checkpoint.file:")} == {
        f"checkpoint.file:{name}" for name in CHECKPOINT_FILES}  # fmt: skip
    for kill in [*DEFAULT_POINTS, *SLOW_POINTS, *(random_kill(i) for i in range(RANDOM_KILLS))]:
        assert kill.fault.action in ("kill", "torn"), kill  # well-formed, and a SIGKILL


def test_a_fault_that_never_strikes_fails_the_test(server: ForkServer, tiny_model_dir: Path, tmp_path: Path) -> None:
    """A HIT past the end of the run: the run finishes (exit 0) and assert_killed fails loudly."""
    kill = Kill("dpo", f"step.optimizer#{STEPS + 1}", CHECKPOINT_STEPS[0])
    out = tmp_path / "too-late"
    code, log = server.run(_argv("dpo", tiny_model_dir, out), fault=kill.spec, log=f"{out}.log", timeout=TIMEOUT)
    assert code == 0 and (out / COMPLETE).is_file(), log[-4000:]
    with pytest.raises(AssertionError, match="the fault never struck: the run ended with exit status 0"):
        assert_killed(code, log, out, kill)


@pytest.mark.parametrize(
    "kill",
    [*DEFAULT_POINTS, *(pytest.param(k, marks=pytest.mark.slow) for k in SLOW_POINTS)],  # slow: every point of every objective
    ids=lambda k: k.id,
)
def test_kill_then_resume_matches_the_uninterrupted_run(
    server: ForkServer, references: Any, tiny_model_dir: Path, tmp_path: Path, kill: Kill
) -> None:
    kill_and_resume(server, tiny_model_dir, references(kill.kind), tmp_path / "run", kill)


@pytest.mark.slow
@pytest.mark.parametrize("i", range(RANDOM_KILLS), ids=lambda i: f"random-{i}")
def test_random_kill_then_resume(server: ForkServer, references: Any, tiny_model_dir: Path, tmp_path: Path,
                                 i: int) -> None:  # fmt: skip
    kill = random_kill(i)
    note = f" (random kill {i} of DPOKIT_FAULT_SEED={SEED})"
    print(f"{kill.id}{note}")
    kill_and_resume(server, tiny_model_dir, references(kill.kind), tmp_path / "run", kill, note)
