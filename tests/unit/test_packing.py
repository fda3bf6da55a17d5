"""dpokit.data.packing builds exactly the layouts its docstring documents, and logps.indexed_logps scores them."""

from __future__ import annotations

import math

import pytest
import torch

from dpokit.config import Config
from dpokit.data.collate import PreferenceCollator, TokenizedPair
from dpokit.data.packing import PackedCollator, balanced_rows, block_causal_mask, first_fit_decreasing
from dpokit.errors import ConfigError
from dpokit.models.layout import attention_cost_tokens, build_collator
from dpokit.models.logps import chunked_lm_head_logps, indexed_logps, naive_sequence_logps, sequence_logps

T, F = True, False


def _pairs() -> list[TokenizedPair]:
    # the same two pairs as tests/unit/test_collate.py
    return [
        TokenizedPair(prompt_ids=[5, 6], chosen_ids=[7, 8, 9], rejected_ids=[10], index=3),
        TokenizedPair(prompt_ids=[11], chosen_ids=[12], rejected_ids=[13, 14, 15, 16], index=7),
    ]


def test_packed_layout_literal() -> None:
    """Sequences: s0 = [5,6|7,8,9] (5), s1 = [11|12] (2), s2 = [5,6|10] (3), s3 = [11|13,14,15,16] (5).
    Budget 8, first-fit decreasing: row 0 = s0 + s2 (8), row 1 = s3 + s1 (7) + one pad token."""
    batch = PackedCollator(pad_token_id=0, packing=True, max_tokens=8)(_pairs())
    assert set(batch) == {"input_ids", "attention_mask", "position_ids", "segment_ids", "score_index", "pair_index"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 5, 6, 10], [11, 13, 14, 15, 16, 11, 12, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 8, [1] * 7 + [0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 4, 0, 1, 0]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 0, 0, 2, 2, 2], [3, 3, 3, 3, 3, 1, 1, -1]]
    # (row, col, target, seq): the logits at (row, col) predict target, summed into seq
    assert batch["score_index"].t().tolist() == [
        [0, 1, 7, 0], [0, 2, 8, 0], [0, 3, 9, 0],  # s0: chosen of pair 0, predicted from col 1..3
        [0, 6, 10, 2],  # s2: rejected of pair 0, predicted from its prompt's last token (col 6)
        [1, 0, 13, 3], [1, 1, 14, 3], [1, 2, 15, 3], [1, 3, 16, 3],  # s3: rejected of pair 1
        [1, 5, 12, 1],  # s1: chosen of pair 1
    ]
    assert batch["pair_index"].tolist() == [3, 7]
    mask = block_causal_mask(batch["segment_ids"])
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == torch.bool
    causal5 = [[k <= q for k in range(5)] for q in range(5)]
    expected_row0 = [r + [F] * 3 for r in causal5] + [[F] * 5 + [k <= q for k in range(3)] for q in range(3)]
    expected_row1 = (
        [r + [F] * 3 for r in causal5]
        + [[F] * 5 + [T, F, F], [F] * 5 + [T, T, F]]
        + [[F] * 7 + [T]]  # padding sees only itself: no attention row is empty (SDPA would give NaN)
    )
    assert mask[:, 0].tolist() == [expected_row0, expected_row1]


def test_prefix_shared_packed_layout_literal() -> None:
    """Pair 0 = [5,6 | 7,8,9 | 10], pair 1 = [11 | 12 | 13,14,15,16]: both 6 tokens, one row of 12.
    Rejected positions continue the prompt (pair 0: 2; pair 1: 1..4), not chosen."""
    batch = PackedCollator(pad_token_id=0, packing=True, prefix_sharing=True, max_tokens=12)(_pairs())
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
    assert batch["attention_mask"].tolist() == [[1] * 12]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 0, 1, 1, 2, 3, 4]]
    assert batch["branch_ids"].tolist() == [[0, 0, 1, 1, 1, 2, 0, 1, 2, 2, 2, 2]]
    assert batch["segment_ids"].tolist() == [[0] * 6 + [1] * 6]
    assert batch["score_index"].t().tolist() == [
        [0, 1, 7, 0], [0, 2, 8, 0], [0, 3, 9, 0],  # chosen of pair 0 (seq 0)
        [0, 1, 10, 2],  # rejected of pair 0 (seq B + 0): ALSO predicted at col 1, the prompt's end
        [0, 6, 12, 1],  # chosen of pair 1 (seq 1), from its one-token prompt at col 6
        [0, 6, 13, 3], [0, 8, 14, 3], [0, 9, 15, 3], [0, 10, 16, 3],  # rejected of pair 1 skips chosen (col 7)
    ]
    z = [F] * 6
    pair0 = [  # keys: 5 6 | 7 8 9 | 10
        [T, F, F, F, F, F],
        [T, T, F, F, F, F],
        [T, T, T, F, F, F],
        [T, T, T, T, F, F],
        [T, T, T, T, T, F],
        [T, T, F, F, F, T],  # rejected 10 sees the prompt and itself, not chosen
    ]
    pair1 = [  # keys: 11 | 12 | 13 14 15 16
        [T, F, F, F, F, F],
        [T, T, F, F, F, F],
        [T, F, T, F, F, F],
        [T, F, T, T, F, F],
        [T, F, T, T, T, F],
        [T, F, T, T, T, T],
    ]
    expected = [r + z for r in pair0] + [z + r for r in pair1]
    assert block_causal_mask(batch["segment_ids"], batch["branch_ids"])[0, 0].tolist() == expected


def test_prefix_sharing_without_packing_gives_one_row_per_pair() -> None:
    batch = PackedCollator(pad_token_id=0, packing=False, prefix_sharing=True, pad_to_multiple_of=4)(_pairs())
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 0, 0], [11, 12, 13, 14, 15, 16, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 0, 1], [0, 1, 1, 2, 3, 4, 0, 1]]
    assert batch["segment_ids"].tolist() == [[0] * 6 + [-1, -1], [1] * 6 + [-1, -1]]
    assert batch["attention_mask"].sum().item() == 12


def test_auto_rows_follow_the_cost_model() -> None:
    """Sequences of 5, 2, 3, 5 tokens (15 in all); modelled cost r * T * (1 + T / K).
    K = inf (flash attention): one row of 15 (cost 15) beats two rows of 8 (16).
    K = 4 (attention dear): r=1 -> 71.25, r=2 -> 2*8*3 = 48, r=3 -> 3*5*2.25 = 33.75, r=4 -> 45."""
    one_row = PackedCollator(pad_token_id=0, packing=True, attention_tokens=math.inf)(_pairs())
    assert one_row["input_ids"].tolist() == [[5, 6, 7, 8, 9, 11, 13, 14, 15, 16, 5, 6, 10, 11, 12]]
    assert one_row["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 0, 1]]
    three = PackedCollator(pad_token_id=0, packing=True, attention_tokens=4)(_pairs())
    assert three["input_ids"].tolist() == [[5, 6, 7, 8, 9], [11, 13, 14, 15, 16], [5, 6, 10, 11, 12]]
    assert three["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]


def test_row_assignment() -> None:
    assert first_fit_decreasing([3, 5, 2, 5, 1], capacity=6) == [[1, 4], [3], [0, 2]]
    assert first_fit_decreasing([9, 2], capacity=4) == [[0], [1]]  # too long: a row of its own
    # K = 6: r rows of T cost r*T*(1+T/6): r=1 (T 16) 58.7, r=2 (5+3 | 5+2+1, T 8) 37.3,
    # r=3 (5+1 | 5 | 3+2, T 6) 36, r=4 (T 5) 36.7 -> 3 rows; longest first onto the shortest row
    assert balanced_rows([3, 5, 2, 5, 1], attention_tokens=6) == [[1, 4], [3], [0, 2]]
    assert balanced_rows([3, 5, 2, 5, 1], attention_tokens=math.inf) == [[1, 3, 0, 2, 4]]
    assert balanced_rows([3, 5, 2, 5, 1], attention_tokens=math.inf, multiple=8) == [[1, 3, 0, 2, 4]]


def test_attention_cost_tokens() -> None:
    """SmolLM2-135M: 576 hidden, 1536 MLP, 9 heads (3 kv) of 64: per layer 576*64*(18+6) + 3*576*1536
    = 3,538,944 linear params, over 2*9*64 -> K = 3072. Flash attention: no cross-sequence work."""

    class Conf:
        hidden_size, intermediate_size, num_attention_heads, num_key_value_heads = 576, 1536, 9, 3
        _attn_implementation = "sdpa"

    class Model:
        config = Conf()

    assert attention_cost_tokens(Model()) == 3072
    Conf._attn_implementation = "flash_attention_2"
    assert attention_cost_tokens(Model()) == math.inf
    Conf._attn_implementation = "dpokit_varlen"
    assert attention_cost_tokens(Model()) == math.inf
    assert attention_cost_tokens(object()) == 4096.0  # no config: a middle-of-the-road guess


def test_build_collator_and_config() -> None:
    cfg = Config()
    assert type(build_collator(cfg.data, 0)) is PreferenceCollator  # padded stays the default
    packed = build_collator(Config().override(["data.packing=true", "data.packing_max_tokens=64"]).data, 0)
    assert isinstance(packed, PackedCollator) and packed.max_tokens == 64 and not packed.prefix_sharing
    with pytest.raises(ConfigError, match="data.prefix_sharing needs a 4D attention mask"):
        Config().override(["data.prefix_sharing=true", "model.attn_implementation=flash_attention_2"]).validate()
    Config().override(["data.packing=true", "model.attn_implementation=flash_attention_2"]).validate()
    Config().override(["data.prefix_sharing=true", "model.attn_implementation=varlen"]).validate()
    Config().override(["model.attn_implementation=varlen"]).validate()  # prefix_sharing auto: on with varlen
    with pytest.raises(ConfigError, match="varlen is for packed batches"):
        Config().override(["model.attn_implementation=varlen", "data.prefix_sharing=false"]).validate()
    with pytest.raises(ConfigError, match="data.packing_max_tokens must be >= 0"):
        Config().override(["data.packing_max_tokens=-1"]).validate()


# ---- indexed_logps ---------------------------------------------------------------------------
def _padded_vs_packed(seed: int) -> tuple[dict, dict]:
    """Random pairs collated both ways (vocab 13)."""
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(1, 13, (n,), generator=g).tolist()

    pairs = [TokenizedPair(ids(2 + k), ids(1 + (3 * k) % 4), ids(1 + k % 3), index=k) for k in range(4)]
    return PreferenceCollator(0)(pairs), PackedCollator(0, packing=True, prefix_sharing=True, max_tokens=16)(pairs)


def test_indexed_logps_equals_the_padded_path_on_position_independent_logits() -> None:
    """With logits that depend only on the current token (a bigram "model"), the packed/prefix-shared
    tuples must score exactly what the padded mask scores: same sums, same lengths, same gradient
    w.r.t. the bigram table (this includes the doubly-used prompt-end positions)."""
    padded, packed = _padded_vs_packed(0)
    table = torch.randn(13, 13, generator=torch.Generator().manual_seed(1))
    upstream = torch.randn(8, generator=torch.Generator().manual_seed(2))
    results = []
    for batch, path in ((padded, "naive"), (packed, "logits"), (packed, "hidden")):
        w = table.clone().requires_grad_(True)
        if path == "naive":
            logps, n = naive_sequence_logps(w[batch["input_ids"]], batch["input_ids"], batch["completion_mask"])
        elif path == "logits":
            logps, n = indexed_logps(w[batch["input_ids"]], *batch["score_index"], 8, chunk_size=3)
        else:  # hidden = one-hot tokens, head weight = table.T: logits = onehot @ table
            hidden = torch.nn.functional.one_hot(batch["input_ids"], 13).float()
            logps, n = indexed_logps(hidden, *batch["score_index"], 8, lm_head_weight=w.t(), chunk_size=2)
        (logps * upstream).sum().backward()
        results.append((logps.detach(), n, w.grad))
    (ref, n_ref, g_ref), *others = results
    for logps, n, grad in others:
        torch.testing.assert_close(logps, ref, atol=1e-5, rtol=1e-5)
        assert n.tolist() == n_ref.tolist() and n.dtype == torch.long
        torch.testing.assert_close(grad, g_ref, atol=1e-5, rtol=1e-5)


def test_indexed_logps_duplicate_positions_gradcheck() -> None:
    """One (row, col) scoring two targets into two sequences: the backward must ADD both gradients."""
    logits = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    rows, cols = torch.tensor([0, 0, 0, 1]), torch.tensor([1, 1, 2, 0])
    targets, seqs = torch.tensor([4, 2, 3, 1]), torch.tensor([0, 1, 1, 2])
    assert torch.autograd.gradcheck(lambda x: indexed_logps(x, rows, cols, targets, seqs, 4, chunk_size=1)[0], (logits,))
    logps, n = indexed_logps(logits, rows, cols, targets, seqs, 4)
    assert n.tolist() == [1, 2, 1, 0] and logps[3] == 0.0


def test_old_entry_points_still_route_through_masks() -> None:
    """sequence_logps / chunked_lm_head_logps keep their mask-based signatures (padded layout)."""
    padded, _ = _padded_vs_packed(3)
    logits = torch.randn(*padded["input_ids"].shape, 13)
    want, n_want = naive_sequence_logps(logits, padded["input_ids"], padded["completion_mask"])
    got, n_got = sequence_logps(logits, padded["input_ids"], padded["completion_mask"])
    torch.testing.assert_close(got, want)
    got_h, n_h = chunked_lm_head_logps(logits, torch.eye(13), padded["input_ids"], padded["completion_mask"], 4)
    torch.testing.assert_close(got_h, want)
    assert n_got.tolist() == n_want.tolist() == n_h.tolist()


def _fake_model(impl: str = "sdpa", **conf: object) -> torch.nn.Module:
    model = torch.nn.Linear(2, 2)
    model.config = type("Conf", (), {"_attn_implementation": impl, **conf})()
    return model


def test_prefix_sharing_auto_resolution() -> None:
    """auto is on where sharing is exact and faster (CPU with a 4D mask; varlen anywhere), off on a GPU
    with SDPA, off without a model, off (and true refused) under a sliding window < max_length."""
    from dpokit.models.layout import resolve_prefix_sharing

    auto = Config().data
    assert auto.prefix_sharing == "auto"
    assert resolve_prefix_sharing(auto, _fake_model("sdpa")) is True  # parameters on CPU
    assert resolve_prefix_sharing(auto, _fake_model("eager"), "cpu") is True
    assert resolve_prefix_sharing(auto, _fake_model("sdpa"), "cuda") is False
    assert resolve_prefix_sharing(auto, _fake_model("dpokit_varlen"), "cuda") is True
    assert resolve_prefix_sharing(auto, _fake_model("flash_attention_2"), "cpu") is False
    assert resolve_prefix_sharing(auto, None) is False
    off = Config().override(["data.prefix_sharing=false"]).data
    assert resolve_prefix_sharing(off, _fake_model("sdpa")) is False
    assert isinstance(build_collator(auto, 0, _fake_model("sdpa")), PackedCollator)
    assert type(build_collator(off, 0, _fake_model("sdpa"))) is PreferenceCollator

    windowed = _fake_model("sdpa", sliding_window=128)  # Mistral-style window shorter than max_length 1024
    assert resolve_prefix_sharing(auto, windowed) is False
    on = Config().override(["data.prefix_sharing=true"]).data
    with pytest.raises(ConfigError, match="sliding window of 128"):
        resolve_prefix_sharing(on, windowed)
    assert resolve_prefix_sharing(on, _fake_model("sdpa", sliding_window=4096)) is True  # window >= max_length
    assert resolve_prefix_sharing(auto, _fake_model("sdpa", sliding_window=128, use_sliding_window=False)) is True


def test_attn_implementation_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto = dpokit's varlen kernel on a CUDA GPU computing in bf16 (weights or autocast), else sdpa."""
    from dpokit.models import varlen
    from dpokit.models.loading import resolve_attn_implementation

    cfg = Config()
    assert cfg.model.attn_implementation == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_attn_implementation(cfg, torch.bfloat16) == "sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(varlen, "flash_available", lambda: True)
    assert resolve_attn_implementation(cfg, torch.bfloat16) == "varlen"
    assert resolve_attn_implementation(cfg, torch.float32) == "sdpa"  # flash needs half precision
    mixed = cfg.override(["train.mixed_precision=bf16"])
    assert resolve_attn_implementation(mixed, torch.float32) == "varlen"
    assert resolve_attn_implementation(cfg.override(["model.attn_implementation=eager"]), torch.bfloat16) == "eager"
    monkeypatch.setattr(varlen, "flash_available", lambda: False)  # torch < 2.10
    assert resolve_attn_implementation(cfg, torch.bfloat16) == "sdpa"
