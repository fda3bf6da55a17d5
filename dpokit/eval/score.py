"""`dpokit score`: a score for every response of given rows, and for pairs the accuracy.

Rows are preference pairs (``prompt`` / ``chosen`` / ``rejected``, any format `dpokit.data.pairs`
reads) or single responses (``prompt`` / ``response``, text or chat messages). Scorers, any number:

* ``implicit`` (``--model POLICY [--ref REF]``): DPO's implicit reward ``beta * (log pi(y|x) -
  log ref(y|x))`` ("your language model is secretly a reward model"). The policy and its reference
  load as in `dpokit evaluate --data` (an adapter folder's reference is its base with the adapters
  off); pairs go through DPO's own batch layouts and forward (`dpokit.models.forward`) with the
  reference's log-probs from `dpokit.models.reference` (or its on-disk cache), single responses
  through the inference pass of `dpokit.eval.scoring`, so these are the numbers training logs;
* ``rm:PATH`` (``--reward``): a reward model; any judge (``--judge``, `dpokit.eval.judges`).

Output: JSON Lines, one line per input row with each scorer's score per response (for pairs, also
whether chosen scored above rejected), and a summary: per scorer the mean score, the pair
accuracy (chosen strictly above rejected; ties counted apart), the rows that failed, and for two or
more scorers on pairs how often they agree and how their margins correlate.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpokit.config import Config
from dpokit.data.collate import TokenizedPair
from dpokit.data.files import Unreadable, expand_files, read_rows, records, row_error, type_name
from dpokit.data.pairs import RawPair, normalize_row, tokenize_pairs
from dpokit.errors import ConfigError, DataError, DpokitError
from dpokit.eval import scoring
from dpokit.eval.judges import JudgeScores, load_judge
from dpokit.eval.sampling import Sample

IMPLICIT = "implicit"


@dataclass
class ScoreRows:
    """The rows to score: pairs (``rejected`` set) or single responses (``rejected`` None)."""

    raw: list[RawPair]  # single responses are RawPair(prompt, response, response)
    files: list[str]
    is_pairs: bool

    def prompts(self) -> list[Any]:
        return [_prompt_for_judge(r.prompt) for r in self.raw]

    def responses(self, side: str) -> list[str]:
        return [_response_text(getattr(r, side)) for r in self.raw]


@dataclass
class ScoreResult:
    rows: ScoreRows
    scores: dict[str, dict[str, JudgeScores]] = field(default_factory=dict)  # scorer -> side -> scores
    beta: float | None = None
    summary: dict[str, Any] = field(default_factory=dict)


# ---- reading rows -------------------------------------------------------------------------------
def read_score_rows(files: Sequence[str], fmt: str = "auto") -> ScoreRows:
    """Every row of ``files``: all pairs, or all single responses (not a mix)."""
    raw: list[RawPair] = []
    kinds: set[bool] = set()
    paths = expand_files(list(files))
    for path in paths:
        for rownum, row in _file_rows(path):
            is_pair = isinstance(row, dict) and "chosen" in row and "rejected" in row
            kinds.add(is_pair)
            raw.append(normalize_row(row, path, rownum, fmt) if is_pair else _single(row, path, rownum))
    if len(kinds) > 1:
        raise DataError(", ".join(map(str, paths)), "mixes preference pairs with single responses; score them apart")
    if not raw:
        raise DataError(", ".join(map(str, paths)), "no rows to score")
    return ScoreRows(raw, [str(p) for p in paths], kinds == {True})


def _file_rows(path: Path) -> list[tuple[int, Any]]:
    """Rows of one file, read as pairs; a columnar file without chosen/rejected as prompt/response."""
    try:
        return list(read_rows(path))
    except DataError as as_pairs:
        try:
            out = []
            for rownum, value in records(path, ("prompt", "response")):
                if isinstance(value, Unreadable):
                    raise value.error
                out.append((rownum, value))
            return out
        except DataError:
            raise as_pairs from None


STAND_IN = "(dpokit score: no second response)"  # the unused "rejected" side of a single response


def _single(row: Any, path: Path, rownum: int) -> RawPair:
    """A (prompt, response) row as a RawPair with the response as ``chosen`` and a short stand-in as
    ``rejected``: pairs' validation and tokenization (which refuse two identical responses) then
    apply unchanged, and only the chosen side is ever scored or shown."""
    if not isinstance(row, dict):
        raise row_error(
            path, rownum, f"expected an object with prompt and response (or chosen/rejected), got {type_name(row)}"
        )
    for name in ("prompt", "response"):
        if name not in row:
            raise row_error(path, rownum, f"missing field '{name}' (fields present: {', '.join(map(str, row))})", name)
    prompt, response = row["prompt"], row["response"]
    if isinstance(prompt, list):  # conversational: the response is the assistant turn(s)
        if isinstance(response, str):
            response = [{"role": "assistant", "content": response}]
        stand_in: Any = [{"role": "assistant", "content": STAND_IN}]
        fmt = "conversational"
    else:
        for name, value in (("prompt", prompt), ("response", response)):  # named as the user wrote them
            if not isinstance(value, str) or not value.strip():
                raise row_error(path, rownum, f"expected non-empty text, got {type_name(value)}", name)
        stand_in, fmt = STAND_IN, "standard"
    # normalize_row validates texts and messages (roles, contents, the last turn the assistant's)
    checked = normalize_row({"prompt": prompt, "chosen": response, "rejected": stand_in}, path, rownum, fmt)
    return RawPair(checked.prompt, checked.chosen, stand_in, checked.kind, str(path), rownum)


def _prompt_for_judge(prompt: Any) -> Any:
    """A one-user-turn chat prompt as its text (as `dpokit evaluate --prompts` prompts are); other
    conversations stay message lists (a reward model renders them with its chat template)."""
    if isinstance(prompt, list) and len(prompt) == 1 and prompt[0].get("role") == "user":
        return str(prompt[0].get("content", ""))
    return prompt


def _response_text(response: Any) -> str:
    if isinstance(response, list):
        return "\n".join(str(m.get("content", "")) for m in response)
    return str(response)


# ---- the implicit reward ------------------------------------------------------------------------
def implicit_rewards(
    model: str, rows: ScoreRows, cfg: Config, ref: str | None = None
) -> tuple[dict[str, JudgeScores], dict[str, list[float | None]]]:
    """beta * (log pi - log ref) per response (cfg.loss.beta), and the log-probs it came from:
    ({side: scores}, {"policy_<side>" / "ref_<side>": log-probs}). Rows that tokenization drops
    (data.max_length) are that row's error."""
    from dpokit.dist import Dist
    from dpokit.eval.pairs import load_for_eval
    from dpokit.models.loading import resolve_dtype

    dist = Dist.local()
    policy, tokenizer, is_adapter = load_for_eval(model, cfg, resolve_dtype(cfg.model.dtype))
    reference = _reference(ref, policy if is_adapter else None, cfg, dist)
    policy.to(dist.device).eval()
    d = cfg.data
    encoded = tokenize_pairs(rows.raw, tokenizer, d.max_length, d.max_prompt_length, d.truncation_mode)
    kept = [k for k, e in enumerate(encoded) if isinstance(e, TokenizedPair)]
    examples = [
        TokenizedPair(e.prompt_ids, e.chosen_ids, e.rejected_ids, n) for n, e in enumerate(encoded[k] for k in kept)
    ]
    if rows.is_pairs:
        logps = _pair_logps(policy, tokenizer, reference, examples, cfg, dist)
    else:
        logps = _single_logps(policy, reference, examples, cfg.train.eval_batch_size)
    n, beta = len(rows.raw), cfg.loss.beta
    full: dict[str, list[float | None]] = {key: [None] * n for key in logps}
    for pos, k in enumerate(kept):
        for key, values in logps.items():
            full[key][k] = values[pos]
    dropped = {k: f"not scored: {e}" for k, e in enumerate(encoded) if not isinstance(e, TokenizedPair)}
    sides = ("chosen", "rejected") if rows.is_pairs else ("chosen",)
    scores = {}
    for side in sides:
        pol, refs = full[f"policy_{side}"], full[f"ref_{side}"]
        values = [None if p is None or r is None else beta * (p - r) for p, r in zip(pol, refs)]
        scores[side] = JudgeScores(IMPLICIT, values, dict(dropped))
    return scores, full


def _reference(ref: str | None, adapter_policy: Any, cfg: Config, dist: Any) -> Any:
    """The Reference of `dpokit evaluate --data`: --ref as a frozen copy, else an adapter's base."""
    from dpokit.models.loading import load_model_and_tokenizer, resolve_dtype
    from dpokit.models.reference import Reference

    if ref is not None:
        ref_model, _ = load_model_and_tokenizer(ref, cfg, resolve_dtype(cfg.model.dtype))
        return Reference("copy", model=ref_model.to(dist.device).eval())
    if adapter_policy is not None:
        return Reference("adapter", policy=adapter_policy)
    raise ConfigError(
        "the implicit reward needs the reference the policy was trained against: pass --ref PATH, or give a "
        "LoRA adapter folder as --model (its base is the reference)"
    )


def _pair_logps(
    policy: Any, tokenizer: Any, reference: Any, pairs: list[TokenizedPair], cfg: Config, dist: Any
) -> dict[str, list[float]]:
    """Policy and reference log-probs of both responses of every pair: DPO's collator (padded,
    packed or prefix-shared), its forward, its reference (cached log-probs when a cache exists)."""
    import sys

    import torch

    from dpokit.models import refcache
    from dpokit.models.forward import concatenated_logps
    from dpokit.models.inference import inference_batches
    from dpokit.objectives.dpo import DPOObjective, pair_length

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = DPOObjective(cfg).build_collator(pad, policy, dist.device)
    reference = refcache.cached_reference_for_eval(
        reference, tokenizer, pairs, cfg, collator, dist, log=lambda m: print(m, file=sys.stderr)
    )
    values = torch.zeros(4, len(pairs), dtype=torch.float32, device=dist.device)  # pol c, pol r, ref c, ref r
    lengths = [pair_length(p) for p in pairs]
    for idx, batch in inference_batches(pairs, lengths, collator, cfg.train.eval_batch_size, dist):
        pol = concatenated_logps(policy, batch)
        ref_c, ref_r = reference.logps(batch)
        at = torch.tensor(idx, device=dist.device)
        values[:, at] = torch.stack([pol.chosen_logps, pol.rejected_logps, ref_c, ref_r]).float()
    with torch.inference_mode():
        values = dist.reduce_sum(values)
    keys = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")
    return {k: [float(v) for v in row] for k, row in zip(keys, values.cpu())}


def _single_logps(
    policy: Any, reference: Any, examples: list[TokenizedPair], batch_size: int
) -> dict[str, list[float]]:
    """Log-probs of prompt + response rows through the inference pass of `dpokit.eval.scoring`."""
    samples = [Sample(e.prompt_ids, e.chosen_ids, "", True) for e in examples]
    pol = scoring.sequence_logps_of_samples(policy, samples, batch_size)
    if reference.mode == "adapter":
        with policy.disable_adapter():
            ref = scoring.sequence_logps_of_samples(policy, samples, batch_size)
    else:
        ref = scoring.sequence_logps_of_samples(reference.model, samples, batch_size)
    return {"policy_chosen": pol, "ref_chosen": ref}


# ---- the command --------------------------------------------------------------------------------
def score(
    data: Sequence[str],
    cfg: Config | None = None,
    model: str | None = None,
    ref: str | None = None,
    scorers: Sequence[str] = (),
    out: str | None = None,
) -> ScoreResult:
    """Score every row of ``data`` with the implicit reward (when ``model`` is given) and each of
    ``scorers`` (judge specs: ``vader``, ``rm:PATH``, ``module:function``); write ``out`` (JSON Lines)
    when given. Returns the scores and the summary."""
    cfg = cfg or Config()
    if model is None and not scorers:
        raise DpokitError("nothing to score with: give --model (the implicit reward), --reward rm:PATH or --judge NAME")
    if ref is not None and model is None:
        raise DpokitError("--ref is the reference of --model (the implicit reward); give --model too")
    rows = read_score_rows(data, cfg.data.format)
    judges = [load_judge(s, cfg, cfg.train.eval_batch_size) for s in scorers]  # a bad spec fails before the model loads
    result = ScoreResult(rows)
    extra: dict[str, list[float | None]] = {}
    if model is not None:
        result.scores[IMPLICIT], extra = implicit_rewards(model, rows, cfg, ref)
        result.beta = cfg.loss.beta
    sides = ("chosen", "rejected") if rows.is_pairs else ("chosen",)
    for judge in judges:
        result.scores[judge.name] = {side: judge(rows.prompts(), rows.responses(side)) for side in sides}
    result.summary = summarize(result)
    if out is not None:
        write_scores(result, extra, Path(out))
    return result


def summarize(result: ScoreResult) -> dict[str, Any]:
    """Per scorer: rows, failed rows, mean score (per side), pair accuracy, ties and mean margin;
    with two scorers or more on pairs, their agreement and margin correlation."""
    rows = result.rows
    out: dict[str, Any] = {"rows": len(rows.raw), "kind": "pairs" if rows.is_pairs else "responses",
                           "files": rows.files, "scorers": {}}  # fmt: skip
    if result.beta is not None:
        out["beta"] = result.beta
    margins: dict[str, list[float | None]] = {}
    for name, sides in result.scores.items():
        failed = sorted({i for js in sides.values() for i in js.errors})
        entry: dict[str, Any] = {"failed": len(failed), "failed_rows": failed[:20]}
        for side, js in sides.items():
            valid = [s for i, s in enumerate(js.scores) if s is not None and i not in failed]
            entry[f"mean_{side}" if rows.is_pairs else "mean"] = sum(valid) / len(valid) if valid else None
        if rows.is_pairs:
            margins[name] = _margins(sides["chosen"], sides["rejected"])
            entry.update(_accuracy(margins[name]))
        out["scorers"][name] = entry
    if len(margins) > 1:
        out["agreement"] = _agreement(margins)
    return out


def _margins(chosen: JudgeScores, rejected: JudgeScores) -> list[float | None]:
    return [None if c is None or r is None else c - r for c, r in zip(chosen.scores, rejected.scores)]


def _accuracy(margins: list[float | None]) -> dict[str, Any]:
    scored = [m for m in margins if m is not None]
    if not scored:
        return {"accuracy": None, "ties": 0, "mean_margin": None, "pairs_scored": 0}
    return {
        "accuracy": sum(m > 0 for m in scored) / len(scored), "ties": sum(m == 0 for m in scored),
        "mean_margin": sum(scored) / len(scored), "pairs_scored": len(scored),
    }  # fmt: skip


def _agreement(margins: dict[str, list[float | None]]) -> list[dict[str, Any]]:
    """For each two scorers: the share of pairs both scored where they prefer the same response, and
    the Pearson correlation of their margins."""
    names = list(margins)
    out = []
    for a_i, a in enumerate(names):
        for b in names[a_i + 1 :]:
            both = [(x, y) for x, y in zip(margins[a], margins[b]) if x is not None and y is not None]
            same = sum((x > 0) == (y > 0) for x, y in both)
            corr = scoring.correlation([x for x, _ in both], [y for _, y in both])
            out.append({"a": a, "b": b, "pairs": len(both), "same_preference": same / len(both) if both else None,
                        "margin_correlation": corr})  # fmt: skip
    return out


def write_scores(result: ScoreResult, logps: dict[str, list[float | None]], path: Path) -> None:
    """One JSON line per input row: its texts, each scorer's score(s), and for pairs whether chosen won."""
    rows = result.rows
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i, raw in enumerate(rows.raw):
            line: dict[str, Any] = {"file": raw.source, "row": raw.row, "prompt": raw.prompt}
            if rows.is_pairs:
                line.update(chosen=raw.chosen, rejected=raw.rejected)
            else:
                line["response"] = raw.chosen
            line["scores"] = {}
            for name, sides in result.scores.items():
                values = {side: js.scores[i] for side, js in sides.items()}
                line["scores"][name] = values if rows.is_pairs else values["chosen"]
                if rows.is_pairs and None not in values.values():
                    line.setdefault("chosen_above", {})[name] = values["chosen"] > values["rejected"]
                errors = {js.errors[i] for js in sides.values() if i in js.errors}
                if errors:
                    line.setdefault("errors", {})[name] = "; ".join(sorted(errors))
            if logps:
                line["logps"] = {k: v[i] for k, v in logps.items()}
            f.write(json.dumps(line, ensure_ascii=False) + "\n")


def render_summary(summary: dict[str, Any]) -> str:
    """The console table: one line per scorer."""
    pairs = summary["kind"] == "pairs"
    head = f"scored {summary['rows']} {summary['kind']}" + (
        f" (implicit reward beta {summary['beta']})" if "beta" in summary else ""
    )
    lines = [head]
    for name, s in summary["scorers"].items():
        fmt = lambda v, spec="+.4f": "n/a" if v is None else format(v, spec)  # noqa: E731
        if pairs:
            text = (f"  {name:<24} accuracy {fmt(s['accuracy'], '.3f')}  margin {fmt(s['mean_margin'])}  "
                    f"chosen {fmt(s['mean_chosen'])}  rejected {fmt(s['mean_rejected'])}  ties {s['ties']}")  # fmt: skip
        else:
            text = f"  {name:<24} mean {fmt(s['mean'])}"
        lines.append(text + (f"  failed rows {s['failed']} (e.g. {s['failed_rows'][:5]})" if s["failed"] else ""))
    for a in summary.get("agreement", []):
        corr = "n/a" if a["margin_correlation"] is None else f"{a['margin_correlation']:+.3f}"
        same = "n/a" if a["same_preference"] is None else f"{a['same_preference']:.3f}"
        lines.append(
            f"  {a['a']} vs {a['b']}: same preference on {same} of {a['pairs']} pairs, margin correlation {corr}"
        )
    return "\n".join(lines)
