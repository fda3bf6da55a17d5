"""`dpokit sample` on the tiny random Llama writes a candidates file `read_candidates` reads, drawn by the
sampling stage `dpokit pairs` uses (chunk k with seed + k); `dpokit agreement` on hand-made labels
(two annotators, an undo, a torn last line) with the VADER judge, and `--merge` files that DPO
training (pairs) and the KTO columns (binary labels) accept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpokit.apps.sample import SampleSettings, load_sampler, run_sample_command, sample_responses
from dpokit.cli import main
from dpokit.data.labels import read_candidates
from tests.conftest import PRESETS

pytest.importorskip("vaderSentiment")

PROMPTS = ["Write a short review of a western.", "Review a horror film.", "Write a review.", "Review a comedy."]


def _prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def test_sample_writes_candidates_from_the_shared_sampling_stage(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out" / "candidates.jsonl"
    code = main(["sample", "--model", str(tiny_model_dir), "--prompts", str(_prompts_file(tmp_path)), "--n", "2",
                 "--out", str(out), "--limit", "3", "--max-new-tokens", "6", "--no-progress"])  # fmt: skip
    assert code == 0 and "wrote 3 candidates" in capsys.readouterr().out
    cands = read_candidates(out)
    assert [c.id for c in cands] == ["c0000", "c0001", "c0002"]
    assert all(len(c.responses) == 2 and c.model == str(tiny_model_dir) for c in cands)
    assert [c.prompt for c in cands] == [[{"role": "user", "content": p}] for p in PROMPTS[:3]]  # chat template

    # chunks of 3 prompts: chunk k draws with seed + k, the same responses `sample_responses` gives
    st = SampleSettings(model=str(tiny_model_dir), prompts=str(_prompts_file(tmp_path)), out=str(tmp_path / "c.jsonl"),
                        n_samples=3, seed=5, max_new_tokens=6, chunk_prompts=3, progress=False)  # fmt: skip
    stats = run_sample_command(st)
    assert (stats.prompts, stats.responses) == (4, 12)
    chunked = read_candidates(st.out)
    assert [c.id for c in chunked] == ["c0000", "c0001", "c0002", "c0003"]
    model, tok = load_sampler(st)
    kw = dict(n=3, max_new_tokens=6, batch_size=st.batch_size)
    expected = sample_responses(model, tok, PROMPTS[:3], seed=5, **kw) + sample_responses(model, tok, PROMPTS[3:], seed=6, **kw)
    assert [list(c.responses) for c in chunked] == expected


# ---- agreement -----------------------------------------------------------------------------------
RESPONSES = [  # (response 0, response 1); VADER prefers 0, 1, 0, 0, 0, 1
    ("a wonderful great film", "an awful boring film"), ("terrible and sad", "superb and happy"),
    ("beautiful fun movie", "ugly dull movie"), ("happy happy", "bad worst"), ("love it", "hate it"),
    ("boring plot", "brilliant plot"),
]  # fmt: skip
# (item, shown, choice) per annotator; the preferred response in brackets
ANN = [(0, [1, 0], "B"), (1, [0, 1], "B"), (3, [0, 1], "tie"), (4, [0, 1], "A"), (5, [1, 0], "A")]  # 0 1 tie 0 1
BOB = [(0, [0, 1], "A"), (1, [1, 0], "B"), (2, [0, 1], "A"), (3, [1, 0], "tie"), (4, [1, 0], "B"), (5, [0, 1], "B")]
# bob:  0 0 0 tie 0 1; ann labels item 2 twice: response 0, undone, then response 1 (A of [1, 0])


def _label(who: str, k: int, item: int, shown: list[int], choice: str) -> dict:
    preferred = {"A": shown[0], "B": shown[1]}.get(choice)
    return {"type": "label", "id": f"{who}-{k}", "item": f"c{item:04d}", "annotator": who, "mode": "pair", "shown": shown,
            "choice": choice, "preferred": preferred, "confidence": 2, "reason": "", "time": 1000.0 + k}  # fmt: skip


def _write_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    cands = tmp_path / "candidates.jsonl"
    cands.write_text("".join(json.dumps({"id": f"c{k:04d}", "prompt": [{"role": "user", "content": f"Review film {k}."}],
                                         "responses": list(r), "model": "tiny"}) + "\n" for k, r in enumerate(RESPONSES)))  # fmt: skip
    rows = [_label("ann", k, *spec) for k, spec in enumerate(ANN)]
    rows += [_label("ann", 10, 2, [0, 1], "A"), {"type": "undo", "id": "ann-10", "annotator": "ann", "time": 1011.0},
             _label("ann", 12, 2, [1, 0], "A")]  # fmt: skip
    ann = tmp_path / "ann.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"type": "label", "id": "ann-13", "item": "c00')  # torn
    bob = tmp_path / "bob.jsonl"
    bob.write_text("".join(json.dumps(_label("bob", 20 + k, *spec)) + "\n" for k, spec in enumerate(BOB)))
    return cands, ann, bob


def test_agreement_report_judge_and_merge(tmp_path: Path, capsys) -> None:
    cands, ann, bob = _write_files(tmp_path)
    merged = tmp_path / "merged.jsonl"
    args = ["agreement", str(ann), str(bob), "--candidates", str(cands), "--judge", "vader", "--merge", str(merged)]
    assert main([*args, "--json"]) == 0
    captured = capsys.readouterr()
    assert "torn last line" in captured.err
    report = json.loads(captured.out)
    pair = report["modes"]["pair"]
    # votes: c0 (0, 0), c1 (1, 0), c2 (1, 0), c3 (tie, tie), c4 (0, 0), c5 (1, 1): 4 of 6 agree
    assert report["labels"] == 12 and pair["raw_agreement"] == pytest.approx(4 / 6)
    # ann 0 1 1 t 0 1 / bob 0 0 0 t 0 1: p_o = 4/6, p_e = (2*4 + 3*1 + 1*1) / 36 = 1/3: kappa 1/2
    assert pair["cohen"][0]["kappa"] == pytest.approx(0.5)
    # P = 4/6; p_0 = 6/12, p_1 = 4/12, p_tie = 2/12: P_e = 56/144; kappa = (2/3 - 7/18) / (11/18) = 5/11
    assert pair["fleiss"]["kappa"] == pytest.approx(5 / 11) and pair["fleiss"]["raters"] == 2
    counts = pair["annotators"]
    assert (counts["ann"]["left_rate"], counts["bob"]["left_rate"], counts["all"]["left_rate"]) == (0.6, 0.4, 0.5)
    assert counts["all"]["tie_rate"] == pytest.approx(2 / 12)
    vader = report["judges"]["vader"]  # the majority: c0 0, c4 0, c5 1 = VADER's; c1, c2 split; c3 a tie
    assert (vader["agree"], vader["items"], vader["no_majority"], vader["people_ties"]) == (3, 3, 2, 1)
    assert {w: (a["agree"], a["items"]) for w, a in vader["by_annotator"].items()} == {"ann": (4, 5), "bob": (4, 5)}
    # preferences only: 3 of 5 agree, d = 0.4, eps = (1 - sqrt(0.2)) / 2; 3 majority rows of margin 2
    eps = (1 - 0.2**0.5) / 2
    r = (eps / (1 - eps)) ** 2
    m = report["merge"]
    assert m["disagreement"] == pytest.approx(0.4) and m["flip_rate"] == pytest.approx(eps)
    assert (m["rows"], m["dropped"]) == (3, {"no_majority": 2, "tie": 1})
    assert m["label_smoothing"] == pytest.approx(r / (1 + r))  # 0.1273

    rows = [json.loads(line) for line in merged.read_text().splitlines()]
    assert [(r["item"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [
        ("c0000", *RESPONSES[0]), ("c0004", *RESPONSES[4]), ("c0005", *RESPONSES[5][::-1])]  # fmt: skip
    assert rows[0]["prompt"] == [{"role": "user", "content": "Review film 0."}]
    assert rows[0]["votes"] == {"chosen": 2, "rejected": 0, "tie": 0} and rows[0]["agreement"] == 1.0

    assert main(args) == 0  # the text report
    text = capsys.readouterr().out
    assert "Cohen's kappa ann vs bob: 0.500" in text and "Fleiss' kappa 0.455" in text
    assert "3 preference pairs from 3 items" in text
    assert "loss.type=robust loss.label_smoothing=0.13" in text

    # policy all: every preference a row (ties dropped): c0 2, c1 1 + 1, c2 1 + 1, c4 2, c5 2
    assert main([*args, "--policy", "all", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["merge"]
    assert (m["rows"], m["dropped"], m["label_smoothing"]) == (10, {"tie_votes": 2}, pytest.approx(eps))


def test_merged_pairs_train_and_binary_labels_merge_as_kto_rows(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    cands, ann, bob = _write_files(tmp_path)
    merged = tmp_path / "merged.jsonl"
    assert main(["agreement", str(ann), str(bob), "--candidates", str(cands), "--merge", str(merged), "--policy", "all"]) == 0
    code = main(["train", str(PRESETS / "tiny.yaml"), f"model.name_or_path={tiny_model_dir}", f"train.output_dir={tmp_path / 'run'}",
                 f"data.train_files=[{merged}]", "data.eval_files=[]", "train.max_steps=1", "train.micro_batch_size=2",
                 "train.progress_bar=false", "loss.type=robust", "loss.label_smoothing=0.28"])  # fmt: skip
    assert code == 0 and (tmp_path / "run" / "run_complete.json").exists()

    binary = tmp_path / "binary.jsonl"
    rows = [{"type": "label", "id": f"{w}-{k}", "item": f"c{k:04d}", "annotator": w, "mode": "binary", "shown": [s],
             "choice": c, "label": c == "up", "time": float(k)}
            for w, k, s, c in [("ann", 0, 0, "up"), ("bob", 0, 0, "up"), ("ann", 1, 1, "up"), ("bob", 1, 1, "down"),
                               ("ann", 2, 1, "down"), ("bob", 2, 1, "skip")]]  # fmt: skip
    binary.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kto = tmp_path / "kto.jsonl"
    assert main(["agreement", str(binary), "--candidates", str(cands), "--merge", str(kto)]) == 0
    out = capsys.readouterr().out
    assert "up rate" in out and "2 KTO rows from 2 items" in out
    got = [json.loads(line) for line in kto.read_text().splitlines()]
    assert [(r["item"], r["completion"], r["label"], r["votes"]) for r in got] == [
        ("c0000", [{"role": "assistant", "content": RESPONSES[0][0]}], True, {"up": 2, "down": 0}),
        ("c0002", [{"role": "assistant", "content": RESPONSES[2][1]}], False, {"up": 0, "down": 1}),
    ]  # fmt: skip
    assert set(got[0]) == {"prompt", "completion", "label", "item", "votes", "agreement"}
