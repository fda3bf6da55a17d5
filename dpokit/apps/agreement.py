"""`dpokit agreement LABELS... [--candidates C] [--judge SPEC ...] [--merge OUT --policy P]`: how far
the people who labelled a candidates file agree, with each other and with judges, how biased they
are towards the left response, and their labels merged into a training file.

The statistics are `dpokit.eval.agreement`'s (formulas in its docstrings); this module reads the
labels files (`dpokit.data.labels.read_labels`: undos applied, a torn last line skipped with a
warning) and the candidates file, scores the shown responses with each judge (`load_judge`: a
lexicon judge, ``rm:PATH`` a reward model as `dpokit score` / `dpokit bon` load it, or
``module:function``), prints the report (``--json``: the same as JSON) and writes the merged file.

``--merge OUT`` (needs ``--candidates``: labels hold response indexes, the texts are there):

* pair labels -> preference pairs ``{"prompt", "chosen", "rejected"}`` in the format
  `dpokit.data.pairs` reads (conversational when the candidate's prompt is a message list, as
  `dpokit pairs` writes), plus ``item``, ``votes`` (the unit's votes: ``{"chosen": 2, "rejected":
  1, "tie": 0}``) and ``agreement`` (the share of them for this row's preference);
* binary labels -> KTO rows ``{"prompt", "completion", "label": true|false}`` (conversational the
  same way), plus ``item``, ``votes`` (``{"up": 2, "down": 1}``) and ``agreement``.

Which labels become rows: ``--policy`` (`dpokit.eval.agreement.merge_votes`): ``majority``, ``drop``
(unanimous only) or ``all`` (a row per vote, disagreement kept). The report gives the observed
disagreement, the per-vote flip rate it implies and the ``loss.label_smoothing`` for the merged
pairs (their expected share of flipped labels) as a `dpokit train` command line.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpokit.data.labels import Candidate, Label, read_candidates, read_labels
from dpokit.errors import DpokitError
from dpokit.eval import agreement as ag
from dpokit.eval.judges import RowJudge, load_judge


def read_all_labels(paths: Sequence[str]) -> tuple[list[Label], list[str]]:
    """The labels in force in ``paths`` and the warnings reading them gave (a torn last line)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        labels = read_labels(paths)
    return labels, [str(w.message) for w in caught]


def check_labels(labels: Sequence[Label], candidates: dict[str, Candidate]) -> tuple[list[Label], int]:
    """The labels whose item is a candidate and whose shown indexes exist, and how many were not."""
    good = [
        lab for lab in labels
        if lab.item in candidates and all(0 <= i < len(candidates[lab.item].responses) for i in lab.shown)
        and len(lab.shown) == (2 if lab.mode == "pair" else 1)
    ]  # fmt: skip
    return good, len(labels) - len(good)


def _prompt_for_judge(prompt: Any) -> Any:
    """A one-user-turn prompt as its text (as `dpokit score` hands judges prompts), else the messages."""
    if isinstance(prompt, list) and len(prompt) == 1 and prompt[0].get("role") == "user":
        return str(prompt[0].get("content", ""))
    return prompt


def judge_preferences(
    judge: RowJudge, votes: ag.Votes, candidates: dict[str, Candidate]
) -> tuple[dict[ag.Unit, str | None], str]:
    """The judge's vote on every pair unit (`ag.judge_preference`), scoring each shown response once,
    and the judge's summary of the rows it failed on ('' when none)."""
    keys = sorted({(unit[0], i) for unit in votes if unit[1] == "pair" for i in unit[2]})
    if not keys:
        return {}, ""
    prompts = [_prompt_for_judge(candidates[item].prompt) for item, _ in keys]
    scored = judge(prompts, [candidates[item].responses[i] for item, i in keys])
    score = dict(zip(keys, scored.scores))
    prefs = {
        unit: ag.judge_preference(unit[2], {i: score[(unit[0], i)] for i in unit[2]})
        for unit in votes if unit[1] == "pair"
    }  # fmt: skip
    return prefs, scored.error_summary()


# ---- merging ------------------------------------------------------------------------------------
def _assistant(text: str, conversational: bool) -> Any:
    return [{"role": "assistant", "content": text}] if conversational else text


def merged_rows(decisions: Sequence[ag.Decision], candidates: dict[str, Candidate]) -> list[dict[str, Any]]:
    """The rows of the merged file: preference pairs for pair units, KTO rows for binary ones."""
    rows: list[dict[str, Any]] = []
    for d in decisions:
        item, mode, shown = d.unit
        cand = candidates[item]
        chat = not isinstance(cand.prompt, str)
        if mode == "pair":
            loser = next(i for i in shown if str(i) != d.winner)
            votes = {"chosen": d.counts[d.winner], "rejected": d.counts.get(str(loser), 0), "tie": d.counts.get(ag.TIE, 0)}
            row = {"prompt": cand.prompt, "chosen": _assistant(cand.responses[int(d.winner)], chat),
                   "rejected": _assistant(cand.responses[loser], chat)}  # fmt: skip
        else:
            votes = {"up": d.counts.get("up", 0), "down": d.counts.get("down", 0)}
            row = {"prompt": cand.prompt, "completion": _assistant(cand.responses[shown[0]], chat),
                   "label": d.winner == "up"}  # fmt: skip
        row.update(item=item, votes=votes, agreement=round(d.agreement, 4))
        rows += [row] * d.rows
    return rows


def merge(
    labels: Sequence[Label], candidates: dict[str, Candidate], out: str, policy: str, min_votes: int,
    mode: str | None,
) -> dict[str, Any]:  # fmt: skip
    """Write the merged file ``out`` from the labels of one mode; returns what the report says of it."""
    modes = sorted({lab.mode for lab in labels})
    if mode is None:
        if len(modes) > 1:
            raise DpokitError("the labels hold both pair and binary labels: merge one kind, --mode pair or --mode binary")
        mode = modes[0] if modes else "pair"
    votes = ag.collect_votes(labels, mode)
    decisions, dropped = ag.merge_votes(votes, policy, min_votes)
    rows = merged_rows(decisions, candidates)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    noise = ag.noise_estimate(votes)
    smoothing = ag.label_smoothing(decisions, policy, noise["flip_rate"]) if mode == "pair" else None
    return {"out": str(path), "mode": mode, "format": "pairs" if mode == "pair" else "kto", "policy": policy,
            "min_votes": min_votes, "rows": len(rows), "items": len({d.unit[0] for d in decisions}),
            "dropped": dropped, "disagreement": noise["disagreement"], "flip_rate": noise["flip_rate"],
            "noise_items": noise["items"], "label_smoothing": smoothing}  # fmt: skip


def train_hint(merged: dict[str, Any]) -> str:
    """The `dpokit train` overrides for the merged pairs: robust DPO at the estimated label-flip share."""
    eps = merged["label_smoothing"]
    files = f"data.train_files=[{merged['out']}]"
    if eps is None:
        return f"dpokit train ... {files}   (no item has two votes: the label noise is unknown)"
    if eps < 0.005:
        return f"dpokit train ... {files}   (no disagreement: plain DPO, loss.label_smoothing=0)"
    return f"dpokit train ... {files} loss.type=robust loss.label_smoothing={min(round(eps, 2) or 0.01, 0.49):g}"


# ---- the report ---------------------------------------------------------------------------------
def _num(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _kappa(value: float | None) -> str:
    return "undefined, one category only" if value is None else f"{value:.3f}"


def _ci(ci: Sequence[float] | None) -> str:
    return "" if ci is None else f" [{ci[0]:.2f}, {ci[1]:.2f}]"


def _annotator_lines(counts: dict[str, dict[str, Any]], mode: str) -> list[str]:
    if mode == "pair":
        lines = [f"  {'annotator':<12} {'labels':>6} {'A':>4} {'B':>4} {'tie':>4} {'skip':>4}  left rate [95% CI]    tie rate  skip rate"]  # fmt: skip
        for who, c in counts.items():
            lines.append(f"  {who:<12} {c['labels']:>6} {c['A']:>4} {c['B']:>4} {c['tie']:>4} {c['skip']:>4}  "
                         f"{_num(c['left_rate'], '.2f'):>4}{_ci(c['left_ci']):<14}   {_num(c['tie_rate'], '.2f'):>6}  "
                         f"{_num(c['skip_rate'], '.2f'):>8}")  # fmt: skip
        return lines
    lines = [f"  {'annotator':<12} {'labels':>6} {'up':>4} {'down':>4} {'skip':>4}  up rate  skip rate"]
    for who, c in counts.items():
        lines.append(f"  {who:<12} {c['labels']:>6} {c['up']:>4} {c['down']:>4} {c['skip']:>4}  "
                     f"{_num(c['up_rate'], '.2f'):>7}  {_num(c['skip_rate'], '.2f'):>9}")  # fmt: skip
    return lines


def _mode_lines(mode: str, s: dict[str, Any]) -> list[str]:
    lines = [f"{mode} labels: {s['labels']} on {s['items']} items", *_annotator_lines(s["annotators"], mode)]
    if mode == "pair":
        lines.append("  left rate: the share of preferences for the response shown left (A); 0.5 = no position bias")
    lines.append(f"  raw agreement {_num(s['raw_agreement'])} over {s['multi_rated_items']} items labelled by >= 2 people")
    for k in s["cohen"]:
        lines.append(f"  Cohen's kappa {k['a']} vs {k['b']}: {_kappa(k['kappa'])} "
                     f"(agreement {k['agreement']:.3f} on {k['items']} shared items)")  # fmt: skip
    f = s["fleiss"]
    if f["raters"] is not None:
        other = f" ({f['left_out']} items with another number of raters left out)" if f["left_out"] else ""
        lines.append(f"  Fleiss' kappa {_kappa(f['kappa'])} over the {f['items']} items with {f['raters']} raters each{other}")
    n = s["noise"]
    if n["disagreement"] is not None:
        lines.append(f"  disagreement {n['disagreement']:.3f} over {n['items']} items with >= 2 non-tie votes: "
                     f"a per-label flip rate of {n['flip_rate']:.3f}")  # fmt: skip
    return lines


LEFT_OUT = {"people_ties": "tie by the people", "no_majority": "split vote", "judge_ties": "judge tie", "failed": "judge failed"}


def _judge_lines(name: str, j: dict[str, Any]) -> list[str]:
    left = ", ".join(f"{what} {j[k]}" for k, what in LEFT_OUT.items())
    line = f"  {name}: agrees with the people's majority on {_num(j['agreement'])} ({j['agree']}/{j['items']} items; left out: {left})"
    each = "; ".join(f"{w} {_num(a['agreement'])} ({a['items']})" for w, a in j["by_annotator"].items())
    return [line] + ([f"    vs each annotator: {each}"] if each else [])


def render_report(report: dict[str, Any]) -> str:
    """The text report of `dpokit agreement` (``report``: what ``--json`` prints)."""
    lines = [f"{report['labels']} labels in force from {len(report['annotators'])} annotators "
             f"({', '.join(report['annotators'])}) on {report['items']} items"]  # fmt: skip
    if report.get("left_out_labels"):
        lines.append(f"  {report['left_out_labels']} labels name items or responses the candidates file lacks: left out")
    for mode, s in report["modes"].items():
        lines += ["", *_mode_lines(mode, s)]
    if report.get("judges"):
        lines += ["", "judges vs people (pair labels)"]
        for name, j in report["judges"].items():
            lines += _judge_lines(name, j)
    m = report.get("merge")
    if m:
        dropped = ", ".join(f"{c} {k.replace('_', ' ')}" for k, c in sorted(m["dropped"].items())) or "none"
        noun = "preference pairs" if m["format"] == "pairs" else "KTO rows"
        lines += ["", f"merged ({m['policy']}, {m['mode']} labels): {m['rows']} {noun} from {m['items']} "
                  f"items -> {m['out']} (dropped: {dropped})"]  # fmt: skip
        if m["mode"] == "pair":
            lines.append(f"  label_smoothing {_num(m['label_smoothing'])}: the expected share of flipped labels in these rows")
            lines.append(f"  {train_hint(m)}")
    return "\n".join(lines)


# ---- the command --------------------------------------------------------------------------------
def agreement_report(
    label_files: Sequence[str], candidates_file: str | None = None, judges: Sequence[str] = (),
    merge_out: str | None = None, policy: str = "majority", min_votes: int = 1, mode: str | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:  # fmt: skip
    """Everything `dpokit agreement` reports (and writes ``merge_out``); JSON-ready."""
    if (judges or merge_out) and candidates_file is None:
        raise DpokitError("--judge and --merge need --candidates: the labels hold response indexes, the texts are there")
    if policy not in ag.POLICIES:
        raise DpokitError(f"--policy must be one of {', '.join(ag.POLICIES)}, got {policy!r}")
    labels, notes = read_all_labels(label_files)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    if not labels:
        raise DpokitError(f"no labels in force in {', '.join(label_files)}")
    loaded = [load_judge(spec, batch_size=batch_size) for spec in judges]  # a bad spec fails before any work
    report: dict[str, Any] = {**ag.summarize(labels), "warnings": notes}
    if candidates_file is None:
        return report
    candidates = {c.id: c for c in read_candidates(candidates_file)}
    labels, report["left_out_labels"] = check_labels(labels, candidates)
    votes = ag.collect_votes(labels, "pair")
    report["judges"] = {}
    for judge in loaded:
        prefs, failures = judge_preferences(judge, votes, candidates)
        if failures:
            print(f"warning: {failures}", file=sys.stderr)
        report["judges"][judge.name] = ag.judge_agreement(votes, prefs)
    if merge_out is not None:
        report["merge"] = merge(labels, candidates, merge_out, policy, min_votes, mode)
    return report


def add_agreement_arguments(parser: argparse.ArgumentParser) -> None:
    """The `dpokit agreement` options."""
    add = parser.add_argument
    add("labels", nargs="+", metavar="LABELS", help="labels files (JSONL written by `dpokit label`)")
    add("--candidates", default=None, metavar="FILE", help="the candidates file the labels refer to (for --judge, --merge)")
    add("--judge", action="append", default=[], metavar="SPEC",
        help="repeatable: vader, textblob, rm:PATH (a reward model), module:function; compared with the people")  # fmt: skip
    add("--merge", default=None, metavar="OUT", help="write the labels as training rows (pairs, or KTO rows for binary labels)")
    add("--policy", default="majority", choices=ag.POLICIES,
        help="majority (strict majority of votes), drop (unanimous items only), all (a row per vote)")  # fmt: skip
    add("--min-votes", type=int, default=1, help="merge only items with at least this many votes (default 1)")
    add("--mode", default=None, choices=["pair", "binary"], help="which labels to merge when a file holds both")
    add("--batch-size", type=int, default=16, help="rows per forward pass of an rm: judge")
    add("--json", action="store_true", help="print the report as JSON")


def agreement_command(args: argparse.Namespace) -> int:
    """Run `dpokit agreement` from parsed arguments; returns the exit status."""
    if args.min_votes < 1:
        raise DpokitError(f"--min-votes must be >= 1, got {args.min_votes}")
    report = agreement_report(args.labels, args.candidates, args.judge, args.merge, args.policy, args.min_votes,
                              args.mode, args.batch_size)  # fmt: skip
    print(json.dumps(report, indent=2) if args.json else render_report(report))
    return 0

