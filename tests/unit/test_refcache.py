"""Reference log-prob cache: cached values equal the live reference's, the key changes with
anything that changes the numbers, files are written atomically and bad files are ignored."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dpokit.config import Config
from dpokit.data import pairs as data
from dpokit.data.collate import PreferenceCollator
from dpokit.dist import Dist
from dpokit.models import refcache
from dpokit.models.loading import load_model_and_tokenizer, load_policy
from dpokit.models.reference import Reference, build_reference
from dpokit.objectives.dpo import reference_mode
from tests.conftest import TOY


def _setup(model_dir: Path, *overrides: str, max_length: int = 64, max_prompt_length: int = 32):
    cfg = Config().override([f"model.name_or_path={model_dir}", "model.dtype=float32",
                             f"data.max_length={max_length}", f"data.max_prompt_length={max_prompt_length}",
                             "train.eval_batch_size=5", *overrides]).validate()
    policy, tok = load_policy(cfg, torch.float32)
    pairs, _ = data.load_pairs([TOY / "eval.jsonl"], tok, cfg.data)
    return cfg, policy, tok, pairs[:23]  # 23: the last batch of 5 is ragged


def _live_logps(reference: Reference, pairs, collator) -> tuple[torch.Tensor, torch.Tensor]:
    batch = collator(pairs)
    return reference.logps(batch)


@pytest.mark.parametrize("lora", [False, True], ids=["copy", "adapter"])
def test_cached_logps_equal_live_reference(tiny_model_dir: Path, tmp_path: Path, lora: bool) -> None:
    extra = ["lora.enabled=true", "lora.r=4"] if lora else []
    cfg, policy, tok, pairs = _setup(tiny_model_dir, *extra, f"reference.cache_dir={tmp_path}")
    live = build_reference(cfg, policy, torch.float32, reference_mode(cfg))
    assert live.mode == ("adapter" if lora else "copy")
    collator = PreferenceCollator(tok.pad_token_id)
    refs = refcache.precompute_references(cfg, policy, tok, torch.float32, {"train": pairs, "eval": pairs[:7]},
                                          collator, Dist.local("cpu"), 1024)
    assert refs["train"].mode == "cached" and refs["train"].model is None and refs["train"].policy is None
    # look the pairs up in a different order and batch size than the pass computed them
    idx = [5, 0, 22, 13, 7, 1]
    batch = collator([pairs[i] for i in idx])
    want_c, want_r = live.logps(batch)
    got_c, got_r = refs["train"].logps(batch)
    torch.testing.assert_close(got_c, want_c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_r, want_r, atol=1e-5, rtol=1e-5)
    assert len(refs["eval"].table) == 7  # each split has its own table


def test_adapter_base_and_plain_model_share_a_fingerprint(tiny_model_dir: Path) -> None:
    cfg, policy, _, _ = _setup(tiny_model_dir, "lora.enabled=true", "lora.r=4")
    with torch.no_grad():  # a trained adapter does not change the base's fingerprint
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_()
    plain, _ = load_model_and_tokenizer(str(tiny_model_dir), cfg, torch.float32)
    assert refcache.weights_fingerprint(policy) == refcache.weights_fingerprint(plain)
    assert refcache.model_config_fingerprint(policy) == refcache.model_config_fingerprint(plain)


def test_any_weight_change_changes_the_fingerprint(tiny_model_dir: Path) -> None:
    cfg, policy, _, _ = _setup(tiny_model_dir)
    before = refcache.weights_fingerprint(policy)
    assert refcache.weights_fingerprint(policy, workers=1) == before  # thread count does not matter
    p = dict(policy.named_parameters())["model.layers.1.mlp.down_proj.weight"]
    with torch.no_grad():
        p[17, 3] = torch.nextafter(p[17, 3], torch.tensor(1.0))  # one ulp of one weight
    assert refcache.weights_fingerprint(policy) != before
    policy.to(torch.bfloat16)
    assert refcache.weights_fingerprint(policy) != before


def test_key_covers_data_truncation_tokenizer_and_dtype(tiny_model_dir: Path) -> None:
    cfg, policy, tok, pairs = _setup(tiny_model_dir)
    spec = refcache.reference_spec(policy, tok, "no", torch.device("cpu"))
    key = spec.key(refcache.pairs_fingerprint(pairs), len(pairs))
    # a data change: one token of one pair
    changed = [data.TokenizedPair(p.prompt_ids, list(p.chosen_ids), p.rejected_ids, p.index) for p in pairs]
    changed[4].chosen_ids[-1] += 1
    assert refcache.pairs_fingerprint(changed) != refcache.pairs_fingerprint(pairs)
    # the prompt / response boundary is part of the key, not just the concatenated ids
    moved = [data.TokenizedPair(p.prompt_ids, p.chosen_ids, p.rejected_ids, p.index) for p in pairs]
    moved[0] = data.TokenizedPair(pairs[0].prompt_ids + pairs[0].chosen_ids[:1], pairs[0].chosen_ids[1:],
                                  pairs[0].rejected_ids, 0)
    assert refcache.pairs_fingerprint(moved) != refcache.pairs_fingerprint(pairs)
    # a shorter max_length truncates some pairs
    _, _, _, short = _setup(tiny_model_dir, max_length=12, max_prompt_length=8)
    assert [len(p.chosen_ids) for p in short] != [len(p.chosen_ids) for p in pairs]  # really truncated
    assert refcache.pairs_fingerprint(short) != refcache.pairs_fingerprint(pairs)
    # autocast, dtype, device and the tokenizer's chat template are in the key
    for other in (
        refcache.ReferenceSpec(**{**spec.__dict__, "autocast": "bf16"}),
        refcache.ReferenceSpec(**{**spec.__dict__, "dtype": "torch.bfloat16"}),
        refcache.ReferenceSpec(**{**spec.__dict__, "device": "cuda"}),
    ):
        assert other.key(refcache.pairs_fingerprint(pairs), len(pairs)) != key
    before = refcache.tokenizer_fingerprint(tok)
    tok.chat_template = "{{ messages }}"
    assert refcache.tokenizer_fingerprint(tok) != before


def test_cache_round_trip_hit_and_corrupt_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg, policy, tok, pairs = _setup(tiny_model_dir)
    collator = PreferenceCollator(tok.pad_token_id)
    live = build_reference(cfg, policy, torch.float32, reference_mode(cfg))
    spec = refcache.reference_spec(policy, tok, "no", torch.device("cpu"))
    args = (collator, 4, Dist.local("cpu"))
    first = refcache.obtain_table(spec, pairs, "eval", tmp_path, live, *args)
    assert not first.hit and first.path.is_file() and first.path.parent == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # no temp file left behind
    again = refcache.obtain_table(spec, pairs, "eval", tmp_path, None, *args)  # lookup only: no live reference
    assert again.hit
    torch.testing.assert_close(again.table.chosen, first.table.chosen, atol=0, rtol=0)
    # a truncated file, garbage, and a valid file holding another key are all ignored
    good = first.path.read_bytes()  # (safetensors' header order varies, so compare contents, not bytes)
    for bad in (good[: len(good) // 2], b"not a safetensors file", None):
        if bad is None:
            other = refcache.obtain_table(spec, pairs[:10], "eval", tmp_path, live, *args)
            bad = other.path.read_bytes()
        first.path.write_bytes(bad)
        with pytest.warns(refcache.RefCacheWarning, match="ignoring reference cache"):
            res = refcache.obtain_table(spec, pairs, "eval", tmp_path, live, *args)
        assert not res.hit
        torch.testing.assert_close(res.table.chosen, first.table.chosen, atol=1e-6, rtol=1e-6)
        assert refcache.obtain_table(spec, pairs, "eval", tmp_path, None, *args).hit  # recomputed and rewritten


def test_cached_lookup_refuses_the_wrong_split(tiny_model_dir: Path) -> None:
    cfg, policy, tok, pairs = _setup(tiny_model_dir)
    collator = PreferenceCollator(tok.pad_token_id)
    live = build_reference(cfg, policy, torch.float32, reference_mode(cfg))
    table = refcache.compute_table(live, pairs[:10], collator, 4, Dist.local("cpu"), split="eval")
    cached = Reference("cached", table=table)
    # same indices 0..3, other pairs: a train table must not answer for eval pairs
    others = [data.TokenizedPair(p.prompt_ids + [5], p.chosen_ids, p.rejected_ids, i) for i, p in enumerate(pairs[10:14])]
    with pytest.raises(RuntimeError, match="do not match"):
        cached.logps(collator(others))
    with pytest.raises(IndexError):  # an index outside the table is an error, never a wrap-around
        cached.logps(collator([data.TokenizedPair([1, 2], [3], [4], 10)]))


def test_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DPOKIT_CACHE", raising=False)
    assert refcache.resolve_cache_dir(None) == Path.home() / ".cache" / "dpokit" / "ref_logps"
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path))
    assert refcache.resolve_cache_dir(None) == tmp_path / "ref_logps"
    assert refcache.resolve_cache_dir(str(tmp_path / "x")) == tmp_path / "x"  # the config key wins


def test_unwritable_cache_dir_warns_and_keeps_the_numbers(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg, policy, tok, pairs = _setup(tiny_model_dir)
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the cache folder should be
    live = build_reference(cfg, policy, torch.float32, reference_mode(cfg))
    spec = refcache.reference_spec(policy, tok, "no", torch.device("cpu"))
    with pytest.warns(refcache.RefCacheWarning, match="could not write"):
        res = refcache.obtain_table(spec, pairs[:4], "train", blocker / "sub", live,
                                    PreferenceCollator(tok.pad_token_id), 4, Dist.local("cpu"))
    assert res.table is not None and len(res.table) == 4
