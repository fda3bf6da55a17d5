"""`dpokit rl` on the tiny random Llama: the toy reward rises under PPO and RLOO, a killed run resumes
bit-exactly, bad rewards and non-finite losses are counted and stop the run, LoRA and a reward-model
value head work, and the command line runs it."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpokit.cli import main
from dpokit.config import Config
from dpokit.errors import DpokitError
from dpokit.rl.loop import load_policy_weights, train_rl
from dpokit.rl.toy import letter_e
from dpokit.training import checkpoint as ckpt

CALLS = {"n": 0, "stop_at": -1}


def interrupting_reward(texts: list[str]) -> list[float]:
    """letter_e, and a SIGINT to this process at the call CALLS['stop_at'] (as Ctrl-C mid-rollout)."""
    CALLS["n"] += 1
    if CALLS["n"] == CALLS["stop_at"]:
        os.kill(os.getpid(), signal.SIGINT)
    return letter_e(texts)


def flaky_reward(texts: list[str]) -> list[float]:
    """NaN for every response whose text contains 'a', letter_e for the others."""
    return [float("nan") if "a" in t else s for t, s in zip(texts, letter_e(texts))]


def broken_reward(texts: list[str]) -> list[float]:
    raise RuntimeError("the reward server is down")


def huge_reward(texts: list[str]) -> list[float]:
    """A finite score whose square overflows float32: the value loss turns infinite."""
    return [3e38 for _ in texts]


def _cfg(model_dir: Path, out: Path, *extra: str) -> Config:
    return Config.from_preset("rl-tiny").override(
        [f"model.name_or_path={model_dir}", f"train.output_dir={out}", "train.progress_bar=false", *extra]
    )


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm", ["ppo", "rloo"])
def test_toy_reward_rises(tiny_model_dir: Path, tmp_path: Path, algorithm: str) -> None:
    extra = ["rl.prompts_per_step=4"] if algorithm == "rloo" else []  # 4 prompts x 2 samples
    result = train_rl(_cfg(tiny_model_dir, tmp_path / "out", f"rl.algorithm={algorithm}", *extra))
    rows = _rows(tmp_path / "out")
    scores = [r["objective/scores"] for r in rows]
    assert len(rows) == 6 and result.steps == 30
    assert scores[-1] > scores[0] + 0.03, scores  # the share of 'e' rises clearly (0.10 -> ~0.16-0.19)
    assert rows[-1]["objective/kl"] > rows[0]["objective/kl"]  # ... paid for with KL to the reference
    for key in ("objective/entropy", "policy/clipfrac", "policy/approxkl", "response_length", "rollout_tokens_per_sec"):
        assert key in rows[-1]
    assert ("value/explained_variance" in rows[-1]) == (algorithm == "ppo")
    assert (tmp_path / "out" / "run_complete.json").is_file()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))  # the final policy is a plain HF folder


def test_sigint_checkpoint_and_bit_exact_resume(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = f"{__name__}:interrupting_reward"
    common = [f"rl.reward={spec}", "train.max_steps=6", "train.log_every=1", "rl.kl_target=1.0", "rl.kl_horizon=50"]
    CALLS.update(n=0, stop_at=-1)
    train_rl(_cfg(tiny_model_dir, tmp_path / "a", *common))
    CALLS.update(n=0, stop_at=3)  # SIGINT while scoring step 3: the step finishes, a checkpoint is written
    stopped = train_rl(_cfg(tiny_model_dir, tmp_path / "b", *common))
    assert stopped.stopped_by == signal.SIGINT and stopped.steps == 3
    assert ckpt.list_checkpoints(tmp_path / "b" / ckpt.CHECKPOINTS)[-1][0] == 3
    resumed = train_rl(_cfg(tiny_model_dir, tmp_path / "b", *common, "train.resume=auto"))
    assert resumed.steps == 6 and "resumed from" in capsys.readouterr().out
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-exact
    timing = ("time/", "_per_sec")
    strip = [{k: v for k, v in r.items() if not any(t in k for t in timing)} for r in _rows(tmp_path / "a")]
    assert strip == [{k: v for k, v in r.items() if not any(t in k for t in timing)} for r in _rows(tmp_path / "b")]
    assert _rows(tmp_path / "b")[-1]["objective/kl_coef"] != 0.01  # the adaptive coefficient moved and was restored


def test_failed_rewards_are_counted_and_left_out(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    result = train_rl(_cfg(tiny_model_dir, tmp_path / "out", f"rl.reward={__name__}:flaky_reward", "train.max_steps=3",
                           "train.log_every=3"))  # fmt: skip
    row = _rows(tmp_path / "out")[-1]
    assert result.steps == 3 and row["bad_rewards"] > 0 and row["finite_updates"] > 0
    assert "not a finite number" in capsys.readouterr().err


def test_a_reward_that_always_fails_stops_the_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DpokitError, match="2 RL steps in a row made no update"):
        train_rl(_cfg(tiny_model_dir, tmp_path / "out", f"rl.reward={__name__}:broken_reward", "train.max_bad_steps=2"))
    assert ckpt.list_checkpoints(tmp_path / "out" / ckpt.CHECKPOINTS)[-1][0] == 2


def test_non_finite_value_loss_is_skipped_and_stops_the_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_model_dir, tmp_path / "out", f"rl.reward={__name__}:huge_reward", "train.max_bad_steps=2",
               "rl.whiten_advantages=true")  # fmt: skip
    with pytest.raises(DpokitError, match="non-finite"):
        train_rl(cfg)


def test_long_prompts_are_skipped_or_refused(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["short one", "word " * 200]) + "\n")
    train_rl(_cfg(tiny_model_dir, tmp_path / "out", f"rl.prompt_files=[{prompts}]", "train.max_steps=1"))
    assert "skipped 1 of 2 prompts longer than rl.max_prompt_length=64: #2" in capsys.readouterr().out
    with pytest.raises(DpokitError, match="every prompt of rl.prompt_files is longer"):
        train_rl(_cfg(tiny_model_dir, tmp_path / "out2", f"rl.prompt_files=[{prompts}]", "rl.max_prompt_length=2"))


def test_lora_policy_with_a_reward_model_value_head(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1)
    rm.config.pad_token_id = rm.config.eos_token_id
    rm.save_pretrained(str(tmp_path / "rm"))
    (tmp_path / "rm" / "tokenizer.json").write_bytes((tiny_model_dir / "tokenizer.json").read_bytes())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_model_dir / name).is_file():
            (tmp_path / "rm" / name).write_bytes((tiny_model_dir / name).read_bytes())
    out = tmp_path / "out"
    result = train_rl(_cfg(tiny_model_dir, out, f"rl.reward=rm:{tmp_path / 'rm'}", "rl.value_model=auto",
                           "lora.enabled=true", "lora.r=4", "train.max_steps=2", "train.save_every=1"))  # fmt: skip
    assert result.steps == 2 and (out / "adapter_config.json").is_file()
    log = capsys.readouterr().out
    assert f"value model from {tmp_path / 'rm'}" in log and "the base (adapters off)" in log
    # a checkpoint's policy part goes into a LoRA model built like the run's
    from dpokit.models.loading import load_policy, resolve_dtype

    cfg = _cfg(tiny_model_dir, out, "lora.enabled=true", "lora.r=4")
    policy, _ = load_policy(cfg, resolve_dtype("float32"))
    load_policy_weights(policy, out / ckpt.CHECKPOINTS / ckpt.folder_name(1))


def test_command_line(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    args = ["rl", "--preset", "rl-tiny", f"model.name_or_path={tiny_model_dir}", f"train.output_dir={out}",
            "train.max_steps=2", "rl.algorithm=rloo", "rl.prompts_per_step=2"]  # fmt: skip
    assert main(args) == 0
    assert "done: 2 RL steps" in capsys.readouterr().out
    assert main([*args, "train.resume=auto"]) == 0  # finished: nothing to do, says so
    assert "holds a finished run" in capsys.readouterr().out
    assert main(["rl", "--preset", "rl-tiny", "rl.algorithm=rloo", "rl.samples_per_prompt=1"]) == 2
    assert "rloo needs rl.samples_per_prompt >= 2" in capsys.readouterr().err


def test_a_reward_model_with_another_tokenizer(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The reward re-tokenises the text with its own tokenizer; the value model, which reads the policy's
    token ids, then starts from the policy (auto) or is refused (rl.value_model=reward)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1)
    rm.config.pad_token_id = rm.config.eos_token_id
    rm.save_pretrained(str(tmp_path / "rm"))
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tok.add_tokens(["<only-in-the-reward-model>"])  # another vocabulary (the new id never occurs in the texts)
    tok.save_pretrained(str(tmp_path / "rm"))
    common = [f"rl.reward=rm:{tmp_path / 'rm'}", "train.max_steps=1", "rl.value_model=auto"]
    assert train_rl(_cfg(tiny_model_dir, tmp_path / "a", *common)).steps == 1
    log = capsys.readouterr().out
    assert "has another tokenizer: the value model starts from the policy" in log and "value model from the policy" in log
    assert "KL estimator k1 x coefficient 0.01 (fixed)" in log
    with pytest.raises(DpokitError, match="rl.value_model=reward: the reward model .* has another tokenizer"):
        train_rl(_cfg(tiny_model_dir, tmp_path / "b", *common[:2], "rl.value_model=reward"))


def test_the_output_has_a_model_card(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    train_rl(_cfg(tiny_model_dir, out, "rl.algorithm=rloo", "rl.prompts_per_step=2", "train.max_steps=1"))
    card = (out / "README.md").read_text()
    assert "trained with RLOO (RLHF) by dpokit" in card and "- prompts: `builtin:toy/train.jsonl`" in card
    assert "| `rl.algorithm` | `rloo` |" in card and "dpokit rl config.yaml" in card
    assert "tags:\n- rlhf\n- dpokit" in card and "time/step" not in card


def test_several_processes_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DpokitError, match="dpokit rl runs in one process, and this one is 1 of 2"):
        train_rl(Config.from_preset("rl-tiny").override([f"train.output_dir={tmp_path / 'out'}"]))
    assert not (tmp_path / "out").exists()
