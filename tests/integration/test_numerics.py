"""Numerical faults: non-finite steps are skipped, counted and logged, a streak of them stops the
run with a checkpoint and advice; the likelihood-displacement warning; fp32 log-probs under bf16."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpokit.config import Config
from dpokit.errors import DpokitError
from dpokit.objectives import dpo
from dpokit.objectives.dpo import DPOObjective
from dpokit.training import loop as trainer
from dpokit.training.checkpoint import CHECKPOINTS, WEIGHTS, folder_name
from tests.conftest import PRESETS, TOY

REPO = Path(__file__).resolve().parents[2]
NAN = float("nan")


def _cfg(model_dir: Path, out: Path, *overrides: str) -> Config:
    return Config.from_yaml(PRESETS / "tiny.yaml").override([
        f"model.name_or_path={model_dir}", f"train.output_dir={out}", f"data.train_files=[{TOY / 'train.jsonl'}]",
        "data.eval_files=[]", "train.progress_bar=false", "train.log_every=1", *overrides])


def _inject(monkeypatch: pytest.MonkeyPatch, nan_loss: set[int], nan_grad: set[int] = frozenset()) -> None:
    """Make the loss (as a NaN forward would: loss and per-pair values) or only the gradient
    non-finite at the given training steps (one micro-batch per step)."""
    real, calls = DPOObjective.batch_values, [0]

    def batch_values(*args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        loss, values = real(*args, **kwargs)
        if not torch.is_grad_enabled():  # the reference and evaluation run without gradients
            return loss, values
        calls[0] += 1
        if calls[0] in nan_loss:
            loss, values = loss * NAN, values.clone().index_fill_(0, torch.tensor([0]), NAN)
        if calls[0] in nan_grad:
            loss.register_hook(lambda g: g * NAN)  # the value stays finite, every gradient is NaN
        return loss, values

    monkeypatch.setattr(DPOObjective, "batch_values", batch_values)


def _weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / CHECKPOINTS / folder_name(step) / WEIGHTS))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_non_finite_steps_are_skipped_counted_and_logged(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "skips"
    _inject(monkeypatch, nan_loss={3, 4}, nan_grad={6})
    trainer.train(_cfg(tiny_model_dir, out, "train.max_steps=8", "train.save_every=1", "train.keep_checkpoints=20"))
    rows = [r for r in _rows(out) if "lr" in r]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 2, 2, 3, 3, 3]
    for r in rows:  # a skipped step adds nothing to the averages and has no (NaN) grad norm in the JSON
        assert ("loss" in r) == (r["step"] not in (3, 4, 6)) and ("grad_norm" in r) == ("loss" in r), r
        assert all(v == v for v in r.values())  # no NaN anywhere
    w = {s: _weights(out, s) for s in range(2, 9)}
    assert _same(w[2], w[3]) and _same(w[3], w[4]) and _same(w[5], w[6])  # no update on skipped steps
    assert not _same(w[4], w[5]) and not _same(w[6], w[7])  # ... and training goes on after them
    opt = torch.load(out / CHECKPOINTS / folder_name(8) / "optimizer.pt", weights_only=True)
    assert {int(s["step"]) for s in opt["state"].values()} == {5}  # 8 steps, 3 skipped
    assert "step 4: non-finite loss or gradient, update skipped (2 in a row" in capsys.readouterr().out


def test_a_streak_of_non_finite_steps_stops_with_a_checkpoint_and_advice(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "streak"
    _inject(monkeypatch, nan_loss=set(range(3, 100)))
    cfg = _cfg(tiny_model_dir, out, "train.max_steps=20", "train.save_every=2", "train.keep_checkpoints=10",
               "train.max_bad_steps=3")
    with pytest.raises(DpokitError) as exc:
        trainer.train(cfg)
    msg = str(exc.value)
    assert "steps 3-5: 3 steps in a row had a non-finite loss or gradient" in msg, msg
    assert "train.lr is 0.001" in msg and "model.dtype is float32" in msg and "train.mixed_precision is no" in msg
    assert str(out / CHECKPOINTS / folder_name(5)) in msg and "train.resume=auto" in msg
    assert _same(_weights(out, 5), _weights(out, 2))  # the checkpoint holds the last good weights
    state = torch.load(out / CHECKPOINTS / folder_name(5) / "trainer_state.pt", weights_only=True)
    assert state["skipped_steps"] == 3 and state["bad_streak"] == 3 and state["step"] == 5


def test_displacement_warning_goes_to_console_and_metrics(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "warn"
    monkeypatch.setattr(dpo, "likelihood_displacement", lambda history: "displaced!" if len(history) >= 2 else None)
    trainer.train(_cfg(tiny_model_dir, out, "train.max_steps=4"))
    warned = [r for r in _rows(out) if "warnings" in r]
    assert warned == [{"step": 2, "warnings": ["displaced!"]}]  # once per run
    assert capsys.readouterr().out.count("warning: displaced!") == 1


def _history(chosen: list[float], margins: list[float], prefix: str = "") -> list[dict[str, float]]:
    """Logged rows with the chosen responses' per-token log-ratio to the reference and the margins."""
    return [{"step": 10 * i, f"{prefix}logratios/chosen": c, f"{prefix}rewards/margins": m}
            for i, (c, m) in enumerate(zip(chosen, margins))]  # fmt: skip


def test_likelihood_displacement_detector() -> None:
    falling, rising = [-0.01, -0.04, -0.05, -0.09, -0.11, -0.15], [0.1, 0.3, 0.4, 0.6, 0.9, 1.2]
    msg = dpo.likelihood_displacement(_history(falling, rising))
    assert msg is not None and "log-ratio to the reference fell from -0.040 to -0.150 nats/token" in msg
    assert "training batches" in msg and "rewards/margins" in msg and "rose" in msg and "loss.nll_weight" in msg
    # one noisy uptick out of four intervals is still "steady"
    assert dpo.likelihood_displacement(_history([-0.01, -0.03, -0.025, -0.05, -0.08], rising[:5])) is not None
    assert dpo.likelihood_displacement(_history([-0.1, -0.08, -0.06, -0.04, -0.02], rising[:5])) is None  # chosen rises
    assert dpo.likelihood_displacement(_history(falling[:5], [1.0, 0.9, 0.8, 0.7, 0.6])) is None  # margins fall
    assert dpo.likelihood_displacement(_history([-0.01, -0.03, -0.01, -0.03, -0.02], rising[:5])) is None  # noise
    assert dpo.likelihood_displacement(_history([-0.010, -0.011, -0.012, -0.013, -0.014], rising[:5])) is None  # tiny
    assert dpo.likelihood_displacement(_history([0.3, 0.25, 0.2, 0.15, 0.1], rising[:5])) is None  # still above ref
    assert dpo.likelihood_displacement(_history(falling[:4], rising[:4])) is None  # too few rows yet
    other_rows = [{"step": 1, "eval/loss": 0.5}, {"step": 2, "warnings": ["x"]}]  # other rows are ignored
    assert dpo.likelihood_displacement(other_rows + _history(falling, rising)) == msg


def test_displacement_reads_the_eval_probe_first() -> None:
    """With three eval rows (the same pairs each time) the trend is read there, not on the batches."""
    noisy_train = _history([-0.01, -0.04, -0.05, -0.09, -0.11], [0.1, 0.3, 0.4, 0.6, 0.9])
    healthy_eval = _history([0.02, 0.05, 0.08], [0.2, 0.5, 0.8], prefix="eval/")
    assert dpo.likelihood_displacement(noisy_train + healthy_eval) is None
    displaced_eval = _history([-0.02, -0.06, -0.12], [0.2, 0.5, 0.8], prefix="eval/")
    msg = dpo.likelihood_displacement(displaced_eval + noisy_train[:2])
    assert msg is not None and "on the eval pairs" in msg and "from -0.020 to -0.120" in msg


def test_logps_and_loss_are_float32_under_bf16_autocast(tiny_model_dir: Path) -> None:
    from dpokit.data import pairs as data
    from dpokit.data.collate import PreferenceCollator
    from dpokit.models.forward import concatenated_logps
    from dpokit.models.loading import load_policy
    from dpokit.models.reference import build_reference
    from dpokit.objectives.dpo import reference_mode

    cfg = _cfg(tiny_model_dir, Path("unused"))
    policy, tok = load_policy(cfg, torch.float32)
    reference = build_reference(cfg, policy, torch.float32, reference_mode(cfg))
    pairs, _ = data.load_pairs([str(TOY / "train.jsonl")], tok, cfg.data)
    batch = PreferenceCollator(pad_token_id=tok.pad_token_id)(pairs[:4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert policy(input_ids=batch["input_ids"]).logits.dtype == torch.bfloat16  # autocast is really on
        for chunk in (1024, 0):  # chunked LM head and full-logits paths
            out = concatenated_logps(policy, batch, chunk)
            assert out.chosen_logps.dtype == out.rejected_logps.dtype == torch.float32
        ref_chosen, ref_rejected = reference.logps(batch)
        objective = DPOObjective(cfg)
        objective.lm_head_chunk = 1024
        objective.set_reference(reference)
        loss, values = objective.batch_values(policy, batch, "train")
    assert ref_chosen.dtype == ref_rejected.dtype == torch.float32
    assert loss.dtype == values.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()  # and the backward through the bf16 model works


def _swap_pairs(path: Path, n: int, seed: int) -> Path:
    """Pairs whose rejected response is the chosen one with its 2nd word swapped: the tokens after the
    swap are the same in both, in slightly different contexts, so pushing the rejected ones down drags
    the chosen ones with them (the similar-responses case of Razin et al. 2024)."""
    import random

    words = "the a cat dog sat ran on under mat rug red blue big small".split()
    rng, rows = random.Random(seed), []
    for _ in range(n):
        prompt = " ".join(rng.choice(words) for _ in range(6))
        x = [rng.choice(words) for _ in range(10)]
        y = list(x)
        y[1] = rng.choice([w for w in words if w != x[1]])
        rows.append({"prompt": prompt, "chosen": " " + " ".join(x), "rejected": " " + " ".join(y)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("case", ["healthy", "displaced"])
def test_displacement_warning_on_a_real_run(tiny_model_dir: Path, tmp_path: Path, case: str) -> None:
    """A healthy run (the toy pairs: chosen log-probs rise with the margins) gives no warning; a run
    that really displaces the chosen responses (see _swap_pairs) is warned about, on the eval probe."""
    if case == "healthy":
        train_file, eval_file = TOY / "train.jsonl", TOY / "eval.jsonl"
    else:
        train_file, eval_file = _swap_pairs(tmp_path / "t.jsonl", 64, 0), _swap_pairs(tmp_path / "e.jsonl", 16, 1)
    out = tmp_path / case
    trainer.train(_cfg(tiny_model_dir, out, "train.max_steps=20", "train.log_every=2", "train.eval_every=4",
                       "train.warmup_steps=0", "train.lr=3e-3", f"data.train_files=[{train_file}]",
                       f"data.eval_files=[{eval_file}]"))  # fmt: skip
    rows = _rows(out)
    ratios = [r["eval/logratios/chosen"] for r in rows if "eval/logratios/chosen" in r]
    warned = [w for r in rows for w in r.get("warnings", [])]
    if case == "healthy":
        assert warned == [] and ratios[-1] > ratios[0] > 0
    else:  # the chosen responses end clearly less likely than under the reference, margins up
        margins = [r["eval/rewards/margins"] for r in rows if "eval/rewards/margins" in r]
        assert len(warned) == 1 and "on the eval pairs" in warned[0]
        assert ratios[-1] < -0.05 and margins[-1] > margins[-3]  # over the three eval rows the check reads
