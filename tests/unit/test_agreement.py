"""Agreement statistics (dpokit/eval/agreement.py) against values worked out by hand: raw agreement,
Cohen's and Fleiss' kappa, the Wilson interval of the position-bias rate, judges vs people, the merge
policies and the label-smoothing estimate. No files, no models."""

from __future__ import annotations

import math

import pytest

from dpokit.apps.agreement import train_hint
from dpokit.data.labels import Label
from dpokit.eval import agreement as ag


def lab(annotator: str, item: str, choice: str, shown: tuple[int, ...] = (0, 1), t: float = 0.0) -> Label:
    """A label as `read_labels` returns it; binary mode for up / down (and skip with a 1-long shown)."""
    mode = "binary" if choice in ("up", "down") or len(shown) == 1 else "pair"
    preferred = {"A": shown[0], "B": shown[-1]}.get(choice) if mode == "pair" else None
    label = {"up": True, "down": False}.get(choice) if mode == "binary" else None
    return Label(id=f"{annotator}-{item}-{t}", item=item, annotator=annotator, mode=mode, shown=shown,
                 choice=choice, preferred=preferred, label=label, time=t)  # fmt: skip


def votes(*units: tuple[str, ...]) -> ag.Votes:
    """Votes of units u0, u1, ... given as category tuples (annotators r0, r1, ...)."""
    return {(f"u{k}", "pair", (0, 1)): {f"r{j}": c for j, c in enumerate(cats)} for k, cats in enumerate(units)}


# ---- votes ------------------------------------------------------------------------------------
def test_votes_latest_label_wins_skips_withdraw_and_units_are_the_pairs_shown():
    labels = [
        lab("ann", "c1", "A", (1, 0), t=1), lab("ann", "c1", "B", (0, 1), t=2),  # relabelled: B of (0, 1) = 1
        lab("bob", "c1", "tie", t=3), lab("bob", "c2", "A", t=4), lab("bob", "c2", "skip", t=5),
        lab("cat", "c1", "A", (2, 1), t=6),  # another pair of c1's responses: another question
        lab("ann", "c3", "up", (0,), t=7), lab("bob", "c3", "skip", (0,), t=8),
    ]  # fmt: skip
    v = ag.collect_votes(labels)
    assert v == {("c1", "pair", (0, 1)): {"ann": "1", "bob": "tie"}, ("c1", "pair", (1, 2)): {"cat": "2"},
                 ("c3", "binary", (0,)): {"ann": "up"}}  # fmt: skip
    assert set(ag.collect_votes(labels, "binary")) == {("c3", "binary", (0,))}
    assert ag.without_ties(v)[("c1", "pair", (0, 1))] == {"ann": "1"}


# ---- agreement between annotators ---------------------------------------------------------------
def test_raw_agreement_by_hand():
    # (0, 0): 1; (0, 1): 0; (0, 0, 1): 1 agreeing rater pair of 3 = 1/3; the 1-vote unit does not count
    agreement, units = ag.raw_agreement(votes(("0", "0"), ("0", "1"), ("0", "0", "1"), ("1",)))
    assert units == 3 and agreement == pytest.approx((1 + 0 + 1 / 3) / 3)  # 4/9
    assert ag.raw_agreement(votes(("0",))) == (None, 0)
    assert ag.unit_agreement({"0": 2, "1": 1}) == pytest.approx(2 / 6)


def test_cohen_kappa_2x2_by_hand():
    #            bob 0   bob 1
    #   ann 0      4       2     | 6
    #   ann 1      1       3     | 4
    #              5       5       10
    # p_o = (4 + 3) / 10 = 0.7; p_e = (6/10)(5/10) + (4/10)(5/10) = 0.5; kappa = (0.7 - 0.5) / 0.5 = 0.4
    pairs = [("0", "0")] * 4 + [("1", "1")] * 3 + [("0", "1")] * 2 + [("1", "0")]
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    assert ag.cohen_kappa(a, b) == pytest.approx(0.4)
    assert ag.cohen_kappa(["0", "1", "tie"], ["0", "1", "tie"]) == pytest.approx(1.0)
    assert ag.cohen_kappa(["0", "0"], ["0", "0"]) is None  # p_e = 1: undefined
    assert ag.cohen_kappa([], []) is None
    # chance-level: p_o = 0.5 = p_e
    assert ag.cohen_kappa(["0", "0", "1", "1"], ["0", "1", "0", "1"]) == pytest.approx(0.0)


def test_pairwise_kappas_on_shared_units():
    v = votes(*pairs_as_units([("0", "0")] * 4 + [("1", "1")] * 3 + [("0", "1")] * 2 + [("1", "0")]))
    v[("solo", "pair", (0, 1))] = {"r0": "1"}  # only one of them: not shared
    (k,) = ag.pairwise_kappas(v)
    assert (k["a"], k["b"], k["items"]) == ("r0", "r1", 10)
    assert k["agreement"] == pytest.approx(0.7) and k["kappa"] == pytest.approx(0.4)


def pairs_as_units(pairs: list[tuple[str, str]]) -> list[tuple[str, ...]]:
    return [tuple(p) for p in pairs]


def test_fleiss_kappa_small_table_by_hand():
    # 4 units x 3 raters, categories x / y:
    #   unit  n_x n_y   P_i = (n_x^2 + n_y^2 - 3) / (3 * 2)
    #    1     3   0    (9 + 0 - 3) / 6 = 1
    #    2     2   1    (4 + 1 - 3) / 6 = 1/3
    #    3     1   2    1/3
    #    4     0   3    1
    # P = (1 + 1/3 + 1/3 + 1) / 4 = 2/3; p_x = 6/12 = p_y; P_e = 1/4 + 1/4 = 1/2
    # kappa = (2/3 - 1/2) / (1 - 1/2) = 1/3
    table = [{"x": 3, "y": 0}, {"x": 2, "y": 1}, {"x": 1, "y": 2}, {"x": 0, "y": 3}]
    assert ag.fleiss_kappa(table) == pytest.approx(1 / 3)
    assert ag.fleiss_kappa([{"x": 2}, {"x": 2}]) is None  # one category: P_e = 1
    with pytest.raises(ValueError, match="same number"):
        ag.fleiss_kappa([{"x": 2}, {"x": 3}])


def test_fleiss_kappa_wikipedia_example():
    """The worked example of Fleiss (1971) as Wikipedia gives it: 10 subjects, 14 raters, 5
    categories; P = 0.378, P_e = 0.213, kappa = 0.210."""
    rows = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
            [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]  # fmt: skip
    table = [{str(c): n for c, n in enumerate(row)} for row in rows]
    assert ag.fleiss_kappa(table) == pytest.approx(0.20993, abs=1e-5)


def test_fleiss_over_votes_uses_the_most_common_number_of_raters():
    # three units with 3 raters (the small table's units 1, 2, 4), one with 2, one with 1
    v = votes(("x", "x", "x"), ("x", "x", "y"), ("y", "y", "y"), ("x", "y"), ("x",))
    f = ag.fleiss_over_votes(v)
    assert (f["raters"], f["items"], f["left_out"], f["item_ids"]) == (3, 3, 1, ["u0", "u1", "u2"])
    # P = (1 + 1/3 + 1) / 3 = 7/9; p_x = 5/9, p_y = 4/9; P_e = 41/81; kappa = (63/81 - 41/81) / (40/81) = 0.55
    assert f["kappa"] == pytest.approx(22 / 40)
    assert ag.fleiss_over_votes(votes(("x",)))["kappa"] is None


# ---- position bias ----------------------------------------------------------------------------
def test_wilson_interval_by_hand():
    # 5 of 10, z^2 = 3.8415: centre (0.5 + 0.19207) / 1.38415 = 0.5;
    # half = 1.96 * sqrt(0.025 + 3.8415 / 400) / 1.38415 = 1.96 * 0.18602 / 1.38415 = 0.26341
    lo, hi = ag.wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.23659, abs=1e-4), pytest.approx(0.76341, abs=1e-4))
    lo, hi = ag.wilson_interval(0, 4)
    assert lo == 0.0 and 0 < hi < 0.5  # inside [0, 1], unlike the Wald interval (0, 0)
    assert ag.wilson_interval(0, 0) is None


def test_position_bias_tie_skip_and_up_rates_per_annotator():
    labels = [lab("ann", f"c{k}", c) for k, c in enumerate(["A", "A", "A", "B", "tie", "skip"])]
    labels += [lab("bob", f"c{k}", c) for k, c in enumerate(["B", "A"])]
    labels += [lab("bob", "c9", c, (0,)) for c in ("up", "up", "down", "skip")]
    counts = ag.label_counts(labels)
    assert list(counts) == ["ann", "bob", "all"]
    ann, bob, every = counts["ann"], counts["bob"], counts["all"]
    assert (ann["A"], ann["B"], ann["tie"], ann["skip"], ann["labels"]) == (3, 1, 1, 1, 6)
    assert ann["left_rate"] == 0.75 and ann["tie_rate"] == pytest.approx(1 / 5) and ann["skip_rate"] == pytest.approx(1 / 6)
    assert ann["left_ci"] == pytest.approx(ag.wilson_interval(3, 4))
    assert bob["left_rate"] == 0.5 and bob["up_rate"] == pytest.approx(2 / 3) and bob["skip_rate"] == pytest.approx(1 / 6)
    assert (every["A"], every["B"], every["labels"]) == (4, 2, 12) and every["left_rate"] == pytest.approx(4 / 6)
    assert ann["up_rate"] is None


# ---- judges vs people -------------------------------------------------------------------------
def test_judge_agreement_by_hand():
    v = votes(("0", "0"), ("1", "1", "0"), ("0", "1"), ("tie", "tie"), ("1",), ("0", "0"), ("1", "1"))
    prefs = {unit: p for unit, p in zip(sorted(v), ["0", "0", "1", "0", "1", "tie", None])}
    j = ag.judge_agreement(v, prefs)
    # u0: majority 0 = judge 0 (agree); u1: majority 1 != judge 0; u2: split; u3: people tie;
    # u4: 1 = 1 (agree); u5: judge tie; u6: judge failed -> 2 of 3
    assert (j["agree"], j["items"], j["no_majority"], j["people_ties"], j["judge_ties"], j["failed"]) == (2, 3, 1, 1, 1, 1)
    assert j["agreement"] == pytest.approx(2 / 3)
    # r0: u0 0=0 yes, u1 1 vs 0 no, u2 0 vs 1 no, u4 1=1 yes -> 2/4; r1: u0 yes, u1 no, u2 yes -> 2/3; r2: u1 0=0 -> 1/1
    assert {w: (a["agree"], a["items"]) for w, a in j["by_annotator"].items()} == {"r0": (2, 4), "r1": (2, 3), "r2": (1, 1)}
    assert ag.judge_preference((1, 3), {1: 0.5, 3: -0.2}) == "1"
    assert ag.judge_preference((1, 3), {1: 0.5, 3: 0.5}) == "tie"
    assert ag.judge_preference((1, 3), {1: 0.5, 3: None}) is None


# ---- merging and label noise ------------------------------------------------------------------
MIXED = votes(("0", "0", "1"), ("0", "1"), ("tie", "tie", "0"), ("1",), ("0", "0"))


def test_merge_majority():
    decisions, dropped = ag.merge_votes(MIXED, "majority")
    assert [(d.unit[0], d.winner, d.rows) for d in decisions] == [("u0", "0", 1), ("u3", "1", 1), ("u4", "0", 1)]
    assert dropped == {"no_majority": 1, "tie": 1}
    assert decisions[0].agreement == pytest.approx(2 / 3) and decisions[0].margin == 1
    assert decisions[2].margin == 2


def test_merge_drop_keeps_only_unanimous_units():
    decisions, dropped = ag.merge_votes(MIXED, "drop")
    assert [(d.unit[0], d.winner) for d in decisions] == [("u3", "1"), ("u4", "0")]
    assert dropped == {"not_unanimous": 3}
    decisions, dropped = ag.merge_votes(MIXED, "drop", min_votes=2)
    assert [d.unit[0] for d in decisions] == ["u4"] and dropped == {"not_unanimous": 3, "too_few_votes": 1}


def test_merge_all_writes_a_row_per_vote():
    decisions, dropped = ag.merge_votes(MIXED, "all")
    rows = [(d.unit[0], d.winner, d.rows) for d in decisions]
    assert rows == [("u0", "0", 2), ("u0", "1", 1), ("u1", "0", 1), ("u1", "1", 1), ("u2", "0", 1), ("u3", "1", 1),
                    ("u4", "0", 2)]  # fmt: skip
    assert sum(d.rows for d in decisions) == 9 and dropped == {"tie_votes": 2}
    with pytest.raises(ValueError, match="policy"):
        ag.merge_votes(MIXED, "vote")


def test_flip_rate_and_label_smoothing_by_hand():
    # 10 units with two votes each, 2 of them split: d = 2/10; eps = (1 - sqrt(1 - 0.4)) / 2 = 0.11270
    v = votes(*([("0", "0")] * 5 + [("1", "1")] * 3 + [("0", "1"), ("1", "0")]))
    noise = ag.noise_estimate(v)
    eps = (1 - math.sqrt(0.6)) / 2
    assert noise["disagreement"] == pytest.approx(0.2) and noise["items"] == 10
    assert noise["flip_rate"] == pytest.approx(eps) == pytest.approx(0.11270, abs=1e-5)
    assert ag.flip_rate(0.0) == 0.0 and ag.flip_rate(0.7) == 0.5
    # majority: the 8 unanimous units (margin 2), each wrong with r / (1 + r), r = (eps / (1 - eps))^2
    # = 0.12702^2 = 0.016133: 0.015877; the 2 split units are dropped
    decisions, _ = ag.merge_votes(v, "majority")
    r = (eps / (1 - eps)) ** 2
    assert len(decisions) == 8
    assert ag.label_smoothing(decisions, "majority", eps) == pytest.approx(r / (1 + r)) == pytest.approx(0.015877, abs=1e-6)
    # all: 20 rows, each one vote, flipped with probability eps
    decisions, _ = ag.merge_votes(v, "all")
    assert sum(d.rows for d in decisions) == 20 and ag.label_smoothing(decisions, "all", eps) == eps
    assert ag.label_smoothing(decisions, "all", None) is None
    assert ag.flip_probability(1, 0.1) == pytest.approx(0.1) and ag.flip_probability(2, 0.1) == pytest.approx(0.01 / 0.82)
    # ties are not preferences: they do not count as disagreement
    assert ag.noise_estimate(votes(("0", "tie"), ("1", "1")))["disagreement"] == 0.0


def test_train_hint():
    out = {"out": "m.jsonl", "label_smoothing": 0.1127}
    assert train_hint(out).endswith("data.train_files=[m.jsonl] loss.type=robust loss.label_smoothing=0.11")
    assert "plain DPO" in train_hint({**out, "label_smoothing": 0.0})
    assert "unknown" in train_hint({**out, "label_smoothing": None})
    assert train_hint({**out, "label_smoothing": 0.006}).endswith("loss.label_smoothing=0.01")


def test_summarize_per_mode():
    labels = [lab("ann", "c1", "A", (1, 0)), lab("bob", "c1", "B", (0, 1)), lab("ann", "c2", "up", (0,))]
    s = ag.summarize(labels)
    assert (s["labels"], s["annotators"], s["items"], list(s["modes"])) == (3, ["ann", "bob"], 2, ["pair", "binary"])
    pair = s["modes"]["pair"]
    assert pair["raw_agreement"] == 1.0 and pair["multi_rated_items"] == 1  # both preferred response 1
    assert pair["cohen"][0]["kappa"] is None  # one shared item, one category: undefined
