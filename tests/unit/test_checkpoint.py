"""dpokit.training.checkpoint on a small module: exact round trip, atomic publish, pruning, and refusal of
missing, truncated, inconsistent or pickled files (with a fall-back to the previous checkpoint)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dpokit.errors import DpokitError
from dpokit.training import checkpoint as C


def _objects(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    model[0].bias.requires_grad_(False)  # frozen parameters are not saved (LoRA-style)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    return model, opt, sched


def _train_a_bit(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: object, n: int = 3) -> None:
    for _ in range(n):
        model(torch.randn(5, 4)).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def _save(root: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: object, keep: int = 2) -> Path:
    tmp = C.begin(root, step)
    C.write_rng(tmp, rank=0)
    state = {"step": step, "consumed": 7 * step, "running": {"sums": torch.arange(3.0), "count": torch.tensor(4.0)}}
    return C.write_and_publish(tmp, step, model, opt, sched, state, "train: {}\n", world_size=1, keep=keep)


def test_round_trip_is_exact(tmp_path: Path) -> None:
    model, opt, sched = _objects()
    _train_a_bit(model, opt, sched)
    path = _save(tmp_path, 3, model, opt, sched)
    after_save = (random.random(), np.random.rand(), torch.rand(3))  # what a continued run draws next
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()

    model2, opt2, sched2 = _objects(seed=1)  # different weights, fresh optimizer and scheduler
    ck = C.load_checkpoint(path)
    C.apply_weights(model2, ck.weights, ck.path)
    opt2.load_state_dict(ck.optimizer)
    sched2.load_state_dict(ck.scheduler)
    C.set_rng_state(ck.rng)

    assert ck.step == 3 and ck.state["consumed"] == 21 and torch.equal(ck.state["running"]["sums"], torch.arange(3.0))
    assert set(ck.weights) == {"0.weight", "1.weight", "1.bias"}  # the frozen bias is not in the file
    for k in ("0.weight", "1.weight", "1.bias"):
        assert torch.equal(model2.state_dict()[k], expected[k])
    for i, s in opt_state["state"].items():
        for k, v in s.items():
            assert torch.equal(opt2.state_dict()["state"][i][k], v)
    assert sched2.last_epoch == sched.last_epoch and sched2.get_last_lr() == sched.get_last_lr()
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert again[:2] == after_save[:2] and torch.equal(again[2], after_save[2])


def test_publish_is_atomic_and_prunes_to_keep(tmp_path: Path) -> None:
    model, opt, sched = _objects()
    stale = C.staging_dir(tmp_path, 9)  # what a run killed mid-save leaves behind
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    assert C.list_checkpoints(tmp_path) == []  # never listed as a checkpoint
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, opt, sched, keep=2)
    assert [s for s, _ in C.list_checkpoints(tmp_path)] == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003", "step-00000004"]  # no staging left
    meta = json.loads((tmp_path / "step-00000004" / "meta.json").read_text())
    assert meta["step"] == 4 and set(meta["files"]) == {
        "model.safetensors", "optimizer.pt", "scheduler.pt", "rng-0.pt", "trainer_state.pt", "config.yaml"}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _truncate_and_fix_meta(folder: Path) -> None:
    """A truncated file whose size meta.json agrees with: caught by reading it."""
    f = folder / C.WEIGHTS
    f.write_bytes(f.read_bytes()[:100])
    meta = json.loads((folder / "meta.json").read_text())
    meta["files"][C.WEIGHTS] = 100
    (folder / "meta.json").write_text(json.dumps(meta))


CORRUPTIONS = {
    "missing optimizer": (lambda d: (d / "optimizer.pt").unlink(), "incomplete: optimizer.pt is missing"),
    "missing meta": (lambda d: (d / "meta.json").unlink(), "incomplete: meta.json is missing"),
    "truncated weights": (lambda d: _truncate(d / C.WEIGHTS), "corrupt: model.safetensors has"),
    "truncated, meta agrees": (_truncate_and_fix_meta, "model.safetensors are unreadable"),
    "truncated state": (lambda d: _truncate(d / "trainer_state.pt"), "corrupt: trainer_state.pt has"),
    "garbage meta": (lambda d: (d / "meta.json").write_text("{not json"), "unreadable meta.json"),
    "foreign meta": (lambda d: (d / "meta.json").write_text('{"step": 2}'), "bad meta.json"),
    "wrong step": (lambda d: (d / "meta.json").write_text(
        (d / "meta.json").read_text().replace('"step": 2', '"step": 5')), "meta.json says step 5"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_damaged_checkpoint_is_refused_and_the_previous_one_used(tmp_path: Path, corruption: str) -> None:
    model, opt, sched = _objects()
    _save(tmp_path, 1, model, opt, sched)
    _train_a_bit(model, opt, sched)
    newest = _save(tmp_path, 2, model, opt, sched)
    damage, needle = CORRUPTIONS[corruption]
    damage(newest)

    with pytest.raises(C.CheckpointError) as exc:
        C.load_checkpoint(newest)
    assert needle in str(exc.value) and str(newest) in str(exc.value)
    warnings: list[str] = []
    ck = C.load_newest(tmp_path, warn=warnings.append)
    assert ck is not None and ck.step == 1
    assert len(warnings) == 1 and needle in warnings[0] and "previous checkpoint" in warnings[0]


def test_no_usable_checkpoint_is_an_error_and_none_at_all_is_none(tmp_path: Path) -> None:
    assert C.load_newest(tmp_path / "nothing_here") is None
    model, opt, sched = _objects()
    (_save(tmp_path, 1, model, opt, sched) / "meta.json").unlink()
    with pytest.raises(C.CheckpointError, match="no usable checkpoint"):
        C.load_newest(tmp_path, warn=lambda m: None)


class _Evil:
    def __reduce__(self) -> tuple:
        return (Path.touch, (Path("/tmp/dpokit_pickle_ran"),))


def test_pickled_objects_are_never_loaded(tmp_path: Path) -> None:
    model, opt, sched = _objects()
    folder = _save(tmp_path, 1, model, opt, sched)
    torch.save({"state": _Evil()}, folder / "optimizer.pt")
    meta = json.loads((folder / "meta.json").read_text())
    meta["files"]["optimizer.pt"] = (folder / "optimizer.pt").stat().st_size
    (folder / "meta.json").write_text(json.dumps(meta))
    Path("/tmp/dpokit_pickle_ran").unlink(missing_ok=True)
    with pytest.raises(C.CheckpointError, match="optimizer.pt is unreadable"):
        C.load_checkpoint(folder)
    assert not Path("/tmp/dpokit_pickle_ran").exists()


def test_weights_of_another_model_are_refused(tmp_path: Path) -> None:
    model, opt, sched = _objects()
    ck = C.load_checkpoint(_save(tmp_path, 1, model, opt, sched))
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    other[0].bias.requires_grad_(False)
    with pytest.raises(C.CheckpointError, match="1.weight has shape"):
        C.apply_weights(other, ck.weights, ck.path)
    with pytest.raises(C.CheckpointError, match="does not fit this model"):
        C.apply_weights(torch.nn.Linear(4, 2), ck.weights, ck.path)


def test_disk_space_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _, _ = _objects()
    trainable = 4 * 8 + 8 * 2 + 2  # the frozen bias does not count
    assert C.estimate_bytes(model, "adamw") == trainable * 4 * 3  # weights + exp_avg + exp_avg_sq
    assert C.estimate_bytes(model, "rmsprop") == trainable * 4 * 2
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=3 * 2**30))
    C.check_disk_space(tmp_path, 2 * 2**30)
    with pytest.raises(DpokitError, match=r"need about 4.00 GiB, 3.00 GiB free"):
        C.check_disk_space(tmp_path, 4 * 2**30)


@pytest.mark.parametrize(("value", "mode"), [(False, "no"), ("no", "no"), ("auto", "auto"), ("runs/x/checkpoints/step-00000010", "path")])
def test_resume_modes(value: str | bool, mode: str) -> None:
    assert C.resume_mode(value) == mode
