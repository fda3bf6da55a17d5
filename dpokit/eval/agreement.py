"""How far people agree on the labels of one candidates file, how far a judge agrees with them, how
biased they are towards the left response, and the labels merged into training rows. Pure
statistics on `dpokit.data.labels.Label` lists: no files, no models (`dpokit agreement`, in
dpokit/apps/agreement.py, reads the files, runs the judges and prints).

What is compared (a **unit**): one item in one mode with one set of responses shown, ``(item, mode,
sorted shown)``. In pair mode with two responses that is the item; with more responses two people
who were shown different pairs did not answer the same question and are not compared. Each
annotator's vote on a unit is their latest label of it in force (undos applied by `read_labels`).

Categories: pair mode, the preferred response's index (``"0"``, ``"1"``, ...) or ``"tie"``; binary
mode ``"up"`` / ``"down"``. A skip is no vote: it counts towards the skip rate and nowhere else.
Worked examples of every formula are in tests/unit/test_agreement.py.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

from dpokit.data.labels import Label

TIE = "tie"
POLICIES = ("majority", "drop", "all")
Unit = tuple[str, str, tuple[int, ...]]  # (item id, mode, the shown response indexes, sorted)
Votes = dict[Unit, dict[str, str]]  # unit -> annotator -> category (skips left out)
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval


def unit_of(label: Label) -> Unit:
    """The question a label answers: ``(item, mode, sorted shown)``."""
    return label.item, label.mode, tuple(sorted(label.shown))


def category(label: Label) -> str | None:
    """The label's vote: pair mode the preferred response index as text or ``"tie"``; binary mode
    ``"up"`` / ``"down"``; None for a skip."""
    if label.choice == "skip":
        return None
    if label.mode == "binary":
        return label.choice
    if label.choice == TIE:
        return TIE
    preferred = label.preferred if label.preferred is not None else label.shown[0 if label.choice == "A" else -1]
    return str(preferred)


def collect_votes(labels: Iterable[Label], mode: str | None = None) -> Votes:
    """Each annotator's latest non-skip vote per unit (``labels`` oldest first, as `read_labels`
    returns them); only units of ``mode`` when given. A later skip withdraws an earlier vote."""
    votes: Votes = {}
    for lab in labels:
        if mode is not None and lab.mode != mode:
            continue
        cat = category(lab)
        unit_votes = votes.setdefault(unit_of(lab), {})
        if cat is None:
            unit_votes.pop(lab.annotator, None)
        else:
            unit_votes[lab.annotator] = cat
    return {unit: v for unit, v in votes.items() if v}


def without_ties(votes: Votes) -> Votes:
    """The votes with ties left out (units left with none dropped): the preferences alone."""
    out = {unit: {a: c for a, c in v.items() if c != TIE} for unit, v in votes.items()}
    return {unit: v for unit, v in out.items() if v}


# ---- agreement between annotators --------------------------------------------------------------
def unit_agreement(counts: Mapping[str, int]) -> float:
    """The share of rater pairs of one unit who agree: ``sum_c n_c (n_c - 1) / (n (n - 1))``.

    Votes (0, 0, 1): 3 rater pairs, one of them agrees ((0, 0)); 2*1 + 1*0 = 2 over 3*2 = 6: 1/3.
    """
    n = sum(counts.values())
    if n < 2:
        raise ValueError("agreement of a unit needs at least two votes")
    return sum(c * (c - 1) for c in counts.values()) / (n * (n - 1))


def raw_agreement(votes: Votes) -> tuple[float | None, int]:
    """(observed agreement, units) over the units with >= 2 votes: the mean over those units of
    `unit_agreement` (with two raters per unit: the share of units where they agree). None, 0 when
    no unit has two votes. Units with (0, 0), (0, 1) and (0, 0, 1): (1 + 0 + 1/3) / 3 = 4/9."""
    shares = [unit_agreement(Counter(v.values())) for v in votes.values() if len(v) >= 2]
    return (sum(shares) / len(shares), len(shares)) if shares else (None, 0)


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float | None:
    """Cohen's kappa of two raters' aligned categories: ``(p_o - p_e) / (1 - p_e)``, with ``p_o``
    the share of items where they agree and ``p_e = sum_c p_a(c) p_b(c)`` the agreement expected by
    chance from each rater's own category shares. None when ``p_e`` is 1 (both always gave the one
    and the same category: no variation to agree beyond chance) or there are no items.

    10 items, a/b: (0, 0) x4, (1, 1) x3, (0, 1) x2, (1, 0) x1: p_o = 7/10; a says 0 on 6/10, b on
    5/10: p_e = 0.6*0.5 + 0.4*0.5 = 0.5; kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4.
    """
    if len(a) != len(b):
        raise ValueError(f"cohen_kappa of {len(a)} and {len(b)} ratings")
    n = len(a)
    if n == 0:
        return None
    p_o = sum(x == y for x, y in zip(a, b)) / n
    count_a, count_b = Counter(a), Counter(b)
    p_e = sum(count_a[c] * count_b[c] for c in count_a) / (n * n)
    return None if p_e >= 1 else (p_o - p_e) / (1 - p_e)


def pairwise_kappas(votes: Votes) -> list[dict[str, Any]]:
    """Cohen's kappa (and the raw agreement) of every two annotators over the units both voted on."""
    names = sorted({a for v in votes.values() for a in v})
    out = []
    for a, b in combinations(names, 2):
        shared = [(v[a], v[b]) for v in votes.values() if a in v and b in v]
        if not shared:
            continue
        xs, ys = [x for x, _ in shared], [y for _, y in shared]
        out.append({"a": a, "b": b, "items": len(shared), "agreement": sum(x == y for x, y in shared) / len(shared),
                    "kappa": cohen_kappa(xs, ys)})  # fmt: skip
    return out


def fleiss_kappa(table: Sequence[Mapping[str, int]]) -> float | None:
    """Fleiss' kappa of N units each rated by the same number m >= 2 of raters; ``table[i][c]`` is
    how many raters put unit i in category c.

    ``P_i = (sum_c n_ic^2 - m) / (m (m - 1))`` (the share of agreeing rater pairs of unit i),
    ``P = mean_i P_i``; ``p_c = sum_i n_ic / (N m)`` (category c's share of all ratings),
    ``P_e = sum_c p_c^2``; ``kappa = (P - P_e) / (1 - P_e)``. None when ``P_e`` is 1 (one category
    only) or there are no units.

    4 units, 3 raters, categories x/y: (3, 0), (2, 1), (1, 2), (0, 3): P_i = 1, 1/3, 1/3, 1, P = 2/3;
    p_x = p_y = 6/12 = 1/2, P_e = 1/2; kappa = (2/3 - 1/2) / (1 - 1/2) = 1/3.
    """
    if not table:
        return None
    sizes = {sum(row.values()) for row in table}
    if len(sizes) != 1 or min(sizes) < 2:
        raise ValueError(f"Fleiss' kappa needs the same number (>= 2) of raters per unit, got {sorted(sizes)}")
    m, n = sizes.pop(), len(table)
    p_bar = sum((sum(c * c for c in row.values()) - m) / (m * (m - 1)) for row in table) / n
    totals: Counter[str] = Counter()
    for row in table:
        totals.update(row)
    p_e = sum((t / (n * m)) ** 2 for t in totals.values())
    return None if p_e >= 1 else (p_bar - p_e) / (1 - p_e)


def fleiss_over_votes(votes: Votes) -> dict[str, Any]:
    """Fleiss' kappa over the units rated by the most common number m >= 2 of raters (a tie between
    counts goes to the larger m); the units rated by another number are left out and counted."""
    by_size = Counter(len(v) for v in votes.values() if len(v) >= 2)
    if not by_size:
        return {"kappa": None, "raters": None, "items": 0, "left_out": 0, "item_ids": []}
    m = max(by_size, key=lambda size: (by_size[size], size))
    used = sorted(unit for unit, v in votes.items() if len(v) == m)
    kappa = fleiss_kappa([Counter(votes[unit].values()) for unit in used])
    return {"kappa": kappa, "raters": m, "items": len(used), "left_out": sum(by_size.values()) - len(used),
            "item_ids": [unit[0] for unit in used]}  # fmt: skip


# ---- position bias and counts ------------------------------------------------------------------
def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of a binomial proportion k/n (95% by default); None for n = 0.

    ``(p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)``: unlike p +- z sqrt(p(1-p)/n) it
    stays inside [0, 1] and keeps its coverage for small n. 5 of 10: (0.2366, 0.7634).
    """
    if n == 0:
        return None
    p, z2 = k / n, z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


COUNT_KEYS = ("labels", "pair", "binary", "A", "B", "tie", "skip", "up", "down")


def _ratio(k: int, n: int) -> float | None:
    return k / n if n else None


def rates(counts: Mapping[str, int]) -> dict[str, Any]:
    """The counts of one annotator (or all) with their rates:

    * ``left_rate``: A / (A + B), the share of pair preferences for the response shown left (0.5 =
      no position bias; the order is randomised per label), with its 95% Wilson interval ``left_ci``;
    * ``tie_rate``: tie / (A + B + tie), over the pair labels that are not skips;
    * ``skip_rate``: skips / all labels (both modes);
    * ``up_rate``: up / (up + down), binary mode.
    """
    a, b, tie, up, down = (counts[k] for k in ("A", "B", "tie", "up", "down"))
    return {**{k: counts[k] for k in COUNT_KEYS}, "left_rate": _ratio(a, a + b), "left_ci": wilson_interval(a, a + b),
            "tie_rate": _ratio(tie, a + b + tie), "skip_rate": _ratio(counts["skip"], counts["labels"]),
            "up_rate": _ratio(up, up + down)}  # fmt: skip


def label_counts(labels: Iterable[Label]) -> dict[str, dict[str, Any]]:
    """Per annotator (and ``"all"``, last): the counts of `COUNT_KEYS` over their labels in force,
    with `rates`. Every label counts, also a second label of the same unit: this measures clicks."""
    counts: dict[str, Counter[str]] = {}
    for lab in labels:
        for who in (lab.annotator, "all"):
            c = counts.setdefault(who, Counter())
            c.update(["labels", lab.mode, lab.choice])
    order = sorted(k for k in counts if k != "all") + (["all"] if "all" in counts else [])
    return {who: rates(counts[who]) for who in order}


# ---- judges vs people --------------------------------------------------------------------------
def majority(counts: Mapping[str, int]) -> str | None:
    """The category with a strict majority (more than half) of the votes, else None (a split)."""
    n = sum(counts.values())
    for cat, c in counts.items():
        if 2 * c > n:
            return cat
    return None


def judge_preference(shown: Sequence[int], scores: Mapping[int, float | None]) -> str | None:
    """A judge's vote on a pair unit from its scores of the responses: the higher scored response's
    index, ``"tie"`` for equal scores, None when a score is missing (the judge failed on it)."""
    i, j = shown
    si, sj = scores.get(i), scores.get(j)
    if si is None or sj is None:
        return None
    return str(i) if si > sj else str(j) if sj > si else TIE


def judge_agreement(votes: Votes, prefs: Mapping[Unit, str | None]) -> dict[str, Any]:
    """A judge against the people on the pair units it voted on (``prefs``, `judge_preference`).

    ``agreement``: over units where the people's `majority` prefers a response and the judge does
    too, the share where both prefer the same one. Left out and counted: ``people_ties`` (the
    majority says tie), ``no_majority`` (a split vote), ``judge_ties`` (equal scores), ``failed``
    (no judge vote). ``by_annotator``: the same against each annotator's own preferences.
    """
    out: dict[str, Any] = dict.fromkeys(("agree", "items", "people_ties", "no_majority", "judge_ties", "failed"), 0)
    per: dict[str, list[int]] = {}  # annotator -> [agree, items]
    for unit, v in votes.items():
        if unit[1] != "pair" or unit not in prefs:
            continue
        pref = prefs[unit]
        people = majority(Counter(v.values()))
        key = ("failed" if pref is None else "no_majority" if people is None else "people_ties" if people == TIE
               else "judge_ties" if pref == TIE else "items")  # fmt: skip
        out[key] += 1
        out["agree"] += key == "items" and people == pref
        if pref is None or pref == TIE:
            continue
        for who, cat in v.items():
            if cat != TIE:
                tally = per.setdefault(who, [0, 0])
                tally[0] += cat == pref
                tally[1] += 1
    out["agreement"] = _ratio(out["agree"], out["items"])
    out["by_annotator"] = {who: {"agreement": _ratio(a, n), "agree": a, "items": n} for who, (a, n) in sorted(per.items())}
    return out


# ---- label noise and merging -------------------------------------------------------------------
def flip_rate(disagreement: float) -> float:
    """The per-vote label-flip rate eps that explains a pairwise disagreement rate d.

    If every vote is the true preference flipped with probability eps, independently, two votes
    disagree with probability d = 2 eps (1 - eps); so eps = (1 - sqrt(1 - 2d)) / 2 (the root below
    1/2; d >= 1/2 gives 1/2: the labels are coin flips). d = 0.2: eps = (1 - sqrt(0.6)) / 2 = 0.1127.
    """
    return (1 - math.sqrt(max(0.0, 1 - 2 * disagreement))) / 2


def flip_probability(margin: int, eps: float) -> float:
    """The chance that a label decided by ``margin`` = (votes for it - votes against) is wrong, under
    the flip model of `flip_rate` with even prior odds: with r = (eps / (1 - eps))^margin, r / (1 + r).
    One vote (margin 1): eps; 2 to 1 also eps; 2 to 0 at eps 0.1: 0.01 / (0.01 + 0.81) = 0.0122."""
    if eps <= 0:
        return 0.0
    if eps >= 0.5:
        return 0.5
    r = (eps / (1 - eps)) ** margin
    return r / (1 + r)


@dataclass
class Decision:
    """One merged outcome: ``winner`` (a response index as text, or up / down) of ``unit``, written as
    ``rows`` identical rows (1, or with policy ``all`` the votes for it)."""

    unit: Unit
    winner: str
    counts: dict[str, int]  # the unit's votes per category, ties included
    rows: int = 1

    @property
    def agreement(self) -> float:
        """The share of the unit's votes (ties included) that are for ``winner``."""
        return self.counts[self.winner] / sum(self.counts.values())

    @property
    def margin(self) -> int:
        """Votes for ``winner`` minus votes for the other preference (ties count for neither)."""
        return 2 * self.counts[self.winner] - sum(c for k, c in self.counts.items() if k != TIE)


def merge_votes(votes: Votes, policy: str = "majority", min_votes: int = 1) -> tuple[list[Decision], dict[str, int]]:
    """The votes of each unit as training rows, and what was dropped (counted by reason).

    * ``majority``: the category with a strict majority of the unit's votes; a majority for tie is
      dropped (``tie``), no majority is dropped (``no_majority``).
    * ``drop``: only units where every vote agrees (``not_unanimous`` dropped; unanimous ties: ``tie``).
    * ``all``: every vote that is not a tie is a row of its own, so a 2-to-1 unit gives two rows one
      way and one the other: the disagreement stays in the data, at the rate the people disagree,
      for a loss that models label noise (robust DPO, ``loss.label_smoothing``). Tie votes are
      dropped (``tie_votes``).

    Units with fewer than ``min_votes`` votes are dropped (``too_few_votes``) under every policy.
    """
    if policy not in POLICIES:
        raise ValueError(f"merge policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    decisions: list[Decision] = []
    dropped: Counter[str] = Counter()
    for unit in sorted(votes):
        counts = dict(Counter(votes[unit].values()))
        if sum(counts.values()) < min_votes:
            dropped["too_few_votes"] += 1
            continue
        if policy == "all":
            decisions += [Decision(unit, cat, counts, c) for cat, c in sorted(counts.items()) if cat != TIE]
            dropped["tie_votes"] += counts.get(TIE, 0)
            continue
        winner = majority(counts) if policy == "majority" else next(iter(counts)) if len(counts) == 1 else None
        if winner is None:
            dropped["no_majority" if policy == "majority" else "not_unanimous"] += 1
        elif winner == TIE:
            dropped["tie"] += 1
        else:
            decisions.append(Decision(unit, winner, counts))
    return decisions, dict(dropped)


def noise_estimate(votes: Votes) -> dict[str, Any]:
    """The observed disagreement of the preferences (ties left out): d = 1 - `raw_agreement` over the
    units with >= 2 of them, and the flip rate eps (`flip_rate`) it implies. None when no unit has two."""
    agreement, units = raw_agreement(without_ties(votes))
    d = None if agreement is None else 1 - agreement
    return {"disagreement": d, "flip_rate": None if d is None else flip_rate(d), "items": units}


def label_smoothing(decisions: Sequence[Decision], policy: str, eps: float | None) -> float | None:
    """The expected share of flipped labels among the merged rows: ``loss.label_smoothing`` for them.

    Policy ``all``: every row is one vote, flipped with probability eps. ``majority`` / ``drop``: the
    mean over rows of `flip_probability` of the row's vote margin (a unanimous 3-vote row is far
    less likely wrong than a single vote). None when eps is unknown or there are no rows.
    """
    rows = sum(d.rows for d in decisions)
    if eps is None or rows == 0:
        return None
    if policy == "all":
        return eps
    return sum(d.rows * flip_probability(d.margin, eps) for d in decisions) / rows


def summarize_mode(labels: Sequence[Label], mode: str) -> dict[str, Any]:
    """Everything `dpokit agreement` reports for the labels of one mode, except the judges."""
    of_mode = [lab for lab in labels if lab.mode == mode]
    votes = collect_votes(of_mode)
    agreement, multi = raw_agreement(votes)
    return {
        "labels": len(of_mode), "items": len({lab.item for lab in of_mode}), "units": len(votes),
        "raw_agreement": agreement, "multi_rated_items": multi, "cohen": pairwise_kappas(votes),
        "fleiss": fleiss_over_votes(votes), "noise": noise_estimate(votes), "annotators": label_counts(of_mode),
    }  # fmt: skip


def summarize(labels: Sequence[Label]) -> dict[str, Any]:
    """The report's statistics, per mode present (``pair`` / ``binary``); JSON-ready."""
    modes = [m for m in ("pair", "binary") if any(lab.mode == m for lab in labels)]
    return {
        "labels": len(labels), "annotators": sorted({lab.annotator for lab in labels}),
        "items": len({lab.item for lab in labels}), "modes": {m: summarize_mode(labels, m) for m in modes},
    }  # fmt: skip
