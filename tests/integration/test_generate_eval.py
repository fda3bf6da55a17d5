"""The sampler's shared prompt cache and `dpokit evaluate --prompts`, on the tiny llama.

* greedy decoding with the prompt prefilled once per prompt is token-for-token the plain path's
  (every row prefilled on its own), whatever the batch size; seeded sampling draws the same tokens;
* a seeded distribution check: first tokens sampled through the shared cache follow the model's own
  next-token distribution (chi-square against the exact softmax, per prompt);
* `dpokit evaluate --prompts` with a baseline, a LoRA adapter and a second full model writes
  samples.jsonl, summary.json and summary.md with win rates, intervals, KL and length bias.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from dpokit.eval.sampling import generate_samples, render_prompt

PROMPTS = ["Write a short review of a film.", "Hi", "Describe the weather in a long sentence, please.", "Why?"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(str(tiny_model_dir))


def _ids(groups: list[list[Any]]) -> list[list[list[int]]]:
    return [[s.response_ids for s in group] for group in groups]


@pytest.mark.parametrize("batch_size", [8, 6, 3])  # 6 and 3: a prompt's samples split across batches
def test_shared_prompt_cache_equals_plain_path(tiny: tuple[Any, Any], batch_size: int) -> None:
    model, tok = tiny
    kw = dict(n=4, max_new_tokens=10, seed=7, batch_size=batch_size)
    greedy = [_ids(generate_samples(model, tok, PROMPTS, temperature=0.0, share_prompt_cache=s, **kw)) for s in (False, True)]
    assert greedy[0] == greedy[1]
    sampled = [_ids(generate_samples(model, tok, PROMPTS, temperature=1.0, share_prompt_cache=s, **kw)) for s in (False, True)]
    flat = [(a, b) for ga, gb in zip(*sampled) for a, b in zip(ga, gb)]
    assert sum(a == b for a, b in flat) >= 0.9 * len(flat)  # the same random draws (see sampling.py)


def test_shared_cache_is_used(tiny: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each distinct prompt of a batch is prefilled once (minus its last token); generate then feeds one token per row."""
    from dpokit.eval import sampling

    model, tok = tiny
    calls: list[int] = []
    real = sampling._shared_prompt_cache

    def spy(model: Any, ids: torch.Tensor, mask: torch.Tensor, keys: list[int]) -> Any:
        cache = real(model, ids, mask, keys)
        calls.append(0 if cache is None else len(set(keys)))
        return cache

    monkeypatch.setattr(sampling, "_shared_prompt_cache", spy)
    generate_samples(model, tok, PROMPTS, n=4, max_new_tokens=2, seed=0, batch_size=8)
    assert calls == [2, 2]  # two batches of two prompts x four samples
    calls.clear()
    generate_samples(model, tok, PROMPTS, n=1, max_new_tokens=2, seed=0, batch_size=8)
    assert calls == [0]  # nothing shared: plain generate


def test_sampled_first_tokens_follow_the_model(tiny_model_dir: Path) -> None:
    """Seeded distribution check of the shared-cache path: per prompt, the first sampled tokens
    against the exact softmax of the model's logits after the prompt (chi-square over the 3 likeliest
    tokens and the rest; df 3, 21 is p ~ 1e-4)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # a random init is nearly uniform: sharpen it so the test has power
    prompts, n = PROMPTS[:2], 300
    groups = generate_samples(model, tok, prompts, n=n, max_new_tokens=1, temperature=1.0, seed=11, batch_size=2 * n)
    for prompt, group in zip(prompts, groups):
        text, add = render_prompt(tok, prompt)
        ids = torch.tensor([tok(text, add_special_tokens=add)["input_ids"]])
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=ids).logits[0, -1].double(), -1)
        top = probs.topk(3).indices.tolist()
        expected = [float(probs[t]) * n for t in top] + [n * (1 - float(probs[top].sum()))]
        firsts = [s.response_ids[0] for s in group]
        observed = [firsts.count(t) for t in top] + [sum(t not in top for t in firsts)]
        assert min(expected) > 5, expected  # chi-square needs enough expected counts per bin
        chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
        assert chi2 < 21, (observed, expected)


# ---- dpokit evaluate --prompts ------------------------------------------------------------------
def short_texts_fail(texts: list[str]) -> list[float]:
    """A judge for the test: the length of the text; a text under 3 characters is not a number."""
    return [len(t) if len(t) >= 3 else "short" for t in texts]  # type: ignore[misc]


def test_evaluate_prompts_cli(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dpokit.cli import main
    from dpokit.models.tiny import build_tiny_llama
    from tests.unit.test_score import _adapter

    other = build_tiny_llama(tmp_path / "other", seed=1)
    adapter = _adapter(tmp_path, tiny_model_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "eval"
    code = main([
        "evaluate", "--prompts", str(prompts), "--model", f"lora={adapter}", "--model", f"base={tiny_model_dir}",
        "--model", f"other={other}", "--baseline", "base", "--judge", "vader",
        "--judge", "tests.integration.test_generate_eval:short_texts_fail", "--samples-per-prompt", "2",
        "--max-new-tokens", "6", "--n-prompts", "3", "--out", str(out), "--json", "model.dtype=float32",
    ])  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert [m["name"] for m in summary["models"]] == ["lora", "base", "other"] and summary["baseline"] == "base"
    assert summary["n_prompts"] == 3 and summary["sampling"]["n"] == 2 and summary["kl_estimator"].startswith("k1")
    models = {m["name"]: m for m in summary["models"]}
    base, lora, oth = models["base"], models["lora"], models["other"]
    assert base["win_rate"]["vader"] == 0.5 and base["win_interval"]["vader"] is None and base["kl"] == 0.0
    assert lora["reference"] == "its base (adapters off)" and oth["reference"] == "baseline base"
    for m in (lora, oth):
        lo, hi = m["win_interval"]["vader"]
        assert 0 <= lo <= m["win_rate"]["vader"] <= hi <= 1 and m["kl_sem"] >= 0
        assert m["mean_length"] > 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 3 * 2 and {r["model"] for r in rows} == {"lora", "base", "other"}
    judge = "tests.integration.test_generate_eval:short_texts_fail"
    failed = [r for r in rows if judge in r.get("errors", {})]
    assert all(r["scores"][judge] is None and len(r["response"]) < 3 for r in failed)
    assert all(r["scores"][judge] == len(r["response"]) for r in rows if r not in failed)
    base_rows = [r for r in rows if r["model"] == "base"]
    assert all(r["logratio"] == 0.0 for r in base_rows)
    # the same seed for every model: the plain and the adapter's samples start from the same draws
    assert [r["prompt_index"] for r in base_rows] == [0, 0, 1, 1, 2, 2]
    md = (out / "summary.md").read_text()
    assert "| | lora | base | other |" in md.replace("|  |", "| |") and "win rate vs base, vader [95% CI]" in md
    assert "KL(model ‖ reference)" in md and "corr(vader score, length)" in md


def test_evaluate_needs_data_or_prompts(capsys: pytest.CaptureFixture[str], tiny_model_dir: Path) -> None:
    from dpokit.cli import main

    assert main(["evaluate", "--model", str(tiny_model_dir)]) == 2
    assert "--data PAIRS" in capsys.readouterr().err
    assert main(["evaluate", "--model", "a", "--model", "b", "--data", "x.jsonl"]) == 2
    assert "one --model" in capsys.readouterr().err
