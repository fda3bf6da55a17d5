"""Models and datasets by Hugging Face Hub id (dpokit.data.hub, models.sources, data.files/pairs):
a Hub cache built by hand (the layout huggingface_hub writes), offline and unreachable errors,
split / subset / revision selection, column mapping, the eval carve and mixture weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import dpokit
from dpokit.config import DataConfig
from dpokit.data import hub
from dpokit.data.files import DataFiles, data_files, expand_files
from dpokit.data.pairs import load_pairs
from dpokit.errors import DataError, ModelError
from dpokit.models.sources import resolve_source

TOKENIZER_DIR = Path(dpokit.__file__).parent / "assets" / "tiny_tokenizer"
SHA = "a" * 40
OLD_SHA = "b" * 40


def hub_repo(cache: Path, kind: str, repo_id: str, files: dict[str, Any], sha: str = SHA, ref: str | None = "main") -> Path:
    """Write a snapshot into a Hub cache as huggingface_hub lays it out (plain files instead of blob
    symlinks, which it reads the same): <kind>s--org--name/snapshots/<sha>/..., refs/<ref> = sha.
    A value is text, bytes, or a Path copied (a folder: its files)."""
    repo = cache / f"{kind}s--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / sha
    for name, value in files.items():
        target = snap / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(value, Path) and value.is_dir():
            shutil.copytree(value, target, dirs_exist_ok=True)
        elif isinstance(value, Path):
            shutil.copyfile(value, target)
        else:
            target.write_bytes(value if isinstance(value, bytes) else value.encode())
    if ref:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(sha)
    return snap


def jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def rows(n: int, tag: str = "") -> list[dict[str, Any]]:
    return [{"prompt": f"Question {tag}{i}?", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"} for i in range(n)]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hub cache, offline; the tokenized-pairs cache off in tmp_path too."""
    folder = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "dpokit"))
    monkeypatch.chdir(tmp_path)  # relative "org/name" paths must not exist by accident
    return folder


@pytest.fixture(scope="module")
def tok() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def cfg(**overrides: Any) -> SimpleNamespace:
    base = {"format": "auto", "max_length": 64, "max_prompt_length": 32, "truncation_mode": "keep_end"}
    return SimpleNamespace(**{**base, **overrides})


# ---- ids and environment ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("org/name", ("org/name", None)),
        ("org/name@main", ("org/name", "main")),
        (f"Org-1/na.me_2@{SHA}", ("Org-1/na.me_2", SHA)),
        ("org/name@refs/convert/parquet", ("org/name", "refs/convert/parquet")),
        ("./org/name", None),
        ("org/name/sub", None),
        ("name", None),
        ("org/name@", None),
        ("org/*.jsonl", None),
    ],
)
def test_parse_hub_id(text: str, expected: tuple[str, str | None] | None) -> None:
    ref = hub.parse_hub_id(text)
    assert (ref and (ref.repo_id, ref.revision)) == expected


def test_dataset_specs_and_cache_dir_are_read_at_call_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert hub.is_dataset_spec("org/name") and hub.is_dataset_spec("hub:org/name@v1")
    assert not hub.is_dataset_spec("data/train.jsonl")  # a missing file, not a dataset id
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert hub.hub_cache_dir() == tmp_path / "c"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub.hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")
    assert hub.hub_offline()


# ---- which files are a split --------------------------------------------------------------------
PARQUET = ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet", "data/test-00000-of-00001.parquet"]


@pytest.mark.parametrize(
    ("names", "split", "subset", "expected"),
    [
        (PARQUET + ["README.md", ".gitattributes"], "train", None, PARQUET[:2]),
        (PARQUET, "test", None, PARQUET[2:]),
        (["train.jsonl", "validation.jsonl"], "validation", None, ["validation.jsonl"]),
        (["train.jsonl", "dev.jsonl"], "validation", None, ["dev.jsonl"]),  # the Hub's split keywords
        (["train/a.parquet", "train/b.parquet", "test/c.parquet"], "train", None, ["train/a.parquet", "train/b.parquet"]),
        (["pairs.jsonl", "more.csv"], "train", None, ["pairs.jsonl", "more.csv"]),  # no split names: all train
        (["en/train-00000-of-00001.parquet", "fr/train-00000-of-00001.parquet"], "train", "fr",
         ["fr/train-00000-of-00001.parquet"]),
        (["data/train_prefs-00000-of-00001.parquet", "data/test_prefs-00000-of-00001.parquet"], "train_prefs", None,
         ["data/train_prefs-00000-of-00001.parquet"]),
        (["default/train/0000.parquet", "default/test/0000.parquet"], "train", None, ["default/train/0000.parquet"]),
    ],
)  # fmt: skip
def test_split_files_by_name(names: list[str], split: str, subset: str | None, expected: list[str]) -> None:
    assert hub.split_files(names, split, subset, [], "org/ds") == expected


@pytest.mark.parametrize(
    ("names", "split", "subset", "message"),
    [
        (["train.jsonl", "test.jsonl"], "validation", None, "has no split 'validation'; its splits: test, train"),
        (["pairs.jsonl"], "test", None, "its splits: train (its files name no splits)"),
        (["en/train.jsonl", "fr/train.jsonl"], "train", None, "several subsets (en, fr); choose one with data.subset"),
        (["en/train.jsonl"], "train", "de", "has no folder 'de' (data.subset); its folders: en"),
        (["data/train.jsonl.gz"], "train", None, "no .parquet/.jsonl/.json/.csv files to read"),
    ],
)
def test_split_files_errors(names: list[str], split: str, subset: str | None, message: str) -> None:
    with pytest.raises(hub.HubError, match="org/ds") as info:
        hub.split_files(names, split, subset, [], "org/ds")
    assert message in str(info.value)


def test_split_files_from_readme_configs() -> None:
    configs = [
        {"config_name": "pairs", "default": True,
         "data_files": [{"split": "train", "path": "pairs/train-*"}, {"split": "test", "path": ["pairs/test-*"]}]},
        {"config_name": "sft", "data_files": "sft/**/*.parquet"},
        {"config_name": "dir", "data_dir": "other"},
    ]  # fmt: skip
    names = ["pairs/train-00000-of-00001.parquet", "pairs/test-00000-of-00001.parquet", "sft/a/b.parquet",
             "other/train.jsonl", "other/test.jsonl"]  # fmt: skip
    assert hub.split_files(names, "train", None, configs, "o/d") == ["pairs/train-00000-of-00001.parquet"]
    assert hub.split_files(names, "test", "pairs", configs, "o/d") == ["pairs/test-00000-of-00001.parquet"]
    assert hub.split_files(names, "train", "sft", configs, "o/d") == ["sft/a/b.parquet"]
    assert hub.split_files(names, "test", "dir", configs, "o/d") == ["other/test.jsonl"]
    with pytest.raises(hub.HubError, match="has no subset 'x'; its subsets: pairs, sft, dir"):
        hub.split_files(names, "train", "x", configs, "o/d")
    with pytest.raises(hub.HubError, match="has no split 'test'; its splits: train"):
        hub.split_files(names, "test", "sft", configs, "o/d")


# ---- datasets from the cache -------------------------------------------------------------------
def test_dataset_split_revision_and_subset_from_the_cache(cache: Path) -> None:
    readme = "---\nconfigs:\n- config_name: main\n  default: true\n  data_files:\n  - split: train\n    path: data/train-*\n"
    readme += "  - split: test\n    path: data/test-*\n- config_name: extra\n  data_files: extra/*.jsonl\n---\n# card\n"
    hub_repo(cache, "dataset", "org/prefs", {
        "README.md": readme,
        "data/train-00000-of-00001.jsonl": jsonl(rows(5, "new")),
        "data/test-00000-of-00001.jsonl": jsonl(rows(2, "test")),
        "extra/x.jsonl": jsonl(rows(3, "extra")),
    })  # fmt: skip
    hub_repo(cache, "dataset", "org/prefs", {"data/train-00000-of-00001.jsonl": jsonl(rows(4, "old"))}, OLD_SHA, ref=None)

    (train,) = expand_files(["org/prefs"])
    assert train.parent.parent.name == SHA and train.name == "train-00000-of-00001.jsonl"
    assert expand_files(["hub:org/prefs"], split="test")[0].name == "test-00000-of-00001.jsonl"
    assert expand_files(["org/prefs"], subset="extra")[0].name == "x.jsonl"
    (old,) = expand_files([f"org/prefs@{OLD_SHA}"])  # a revision: that commit's files
    assert old.parent.parent.name == OLD_SHA


def test_hub_dataset_rows_and_errors_name_the_dataset(cache: Path, tok: Any) -> None:
    bad = rows(3) + [{"prompt": "Q?", "chosen": 5, "rejected": "x"}]
    hub_repo(cache, "dataset", "org/bad", {"data/train-00000-of-00001.jsonl": jsonl(bad)})
    with pytest.raises(DataError) as info:
        load_pairs(["org/bad"], tok, cfg())
    assert f"org/bad@{SHA[:12]}:data/train-00000-of-00001.jsonl, line 4, field 'chosen'" in str(info.value)
    assert str(cache) not in str(info.value)  # the snapshot path is not what the user typed
    hub_repo(cache, "dataset", "org/good", {"train.jsonl": jsonl(rows(6)), "test.jsonl": jsonl(rows(2, "t"))})
    pairs, summary = load_pairs(["org/good"], tok, cfg())
    assert len(pairs) == 6 and summary.files == [f"org/good@{SHA[:12]}:train.jsonl"]
    # a plain list equal to data.eval_files reads data.eval_split
    pairs, _ = load_pairs(["org/good"], tok, cfg(eval_files=["org/good"], eval_split="test"))
    assert len(pairs) == 2


def test_dataset_offline_not_cached_and_unreachable(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError) as info:
        expand_files(["org/missing"])
    message = str(info.value)
    assert "org/missing: not a local file or folder; Hub dataset 'org/missing' is not in the local Hugging Face cache" in message
    assert str(cache) in message and "HF_HUB_OFFLINE=1 forbids downloading" in message
    _unreachable(monkeypatch)
    with pytest.raises(DataError, match="could not download Hub dataset 'org/missing'.*the Hub could not be reached"):
        expand_files(["org/missing"])
    with pytest.raises(DataError, match="no such file or folder"):  # a missing file is not sent to the Hub
        expand_files(["data/train.jsonl"])


def _unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Online, but the Hub endpoint refuses connections at once (no test ever touches the network).
    huggingface_hub read HF_HUB_OFFLINE (set by conftest) at import, so its constant is reset too."""
    import huggingface_hub.constants as constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")


# ---- models -------------------------------------------------------------------------------------
def test_model_by_hub_id(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {"config.json": "{}", "tokenizer.json": "{}", "model.safetensors": b"x"}
    snap = hub_repo(cache, "model", "org/tiny", files)
    hub_repo(cache, "model", "org/tiny", {**files, "generation_config.json": "{}"}, OLD_SHA, ref=None)
    src = resolve_source("org/tiny")
    assert (src.kind, src.path, src.name, src.hub_id, src.revision) == ("hf_dir", snap, "org/tiny", "org/tiny", SHA)
    assert resolve_source(f"org/tiny@{OLD_SHA}").revision == OLD_SHA
    hub_repo(cache, "model", "org/pickled", {"config.json": "{}", "pytorch_model.bin": b"x"})
    with pytest.raises(ModelError, match=r"no model\*.safetensors weights .*only with model.allow_pickle: true"):
        resolve_source("org/pickled")
    assert resolve_source("org/pickled", allow_pickle=True).hub_id == "org/pickled"
    local = tmp_path / "org" / "tiny"  # a local folder of the same name wins
    shutil.copytree(snap, local)
    assert resolve_source("org/tiny").path == local.resolve()


def test_model_hub_errors(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelError) as info:
        resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "is not in the local Hugging Face cache" in str(info.value)
    assert "run once online or unset HF_HUB_OFFLINE" in str(info.value)
    _unreachable(monkeypatch)
    with pytest.raises(ModelError) as info:
        resolve_source("org/nowhere@v2")
    assert "could not download Hub model 'org/nowhere@v2'" in str(info.value)
    assert "the Hub could not be reached (ConnectError" in str(info.value)


# ---- column mapping, eval carve, mixture weights ------------------------------------------------
def test_column_mapping(tmp_path: Path, tok: Any) -> None:
    data = [{"question": f"Q{i}?", "response_j": f"yes {i}", "response_k": f"no {i}", "prompt": "ignored"} for i in range(3)]
    path = tmp_path / "se.jsonl"
    path.write_text(jsonl(data))
    columns = {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
    pairs, _ = load_pairs([path], tok, cfg(columns=columns))
    expected, _ = load_pairs([_as_standard(tmp_path, data)], tok, cfg())
    assert [(p.prompt_ids, p.chosen_ids) for p in pairs] == [(p.prompt_ids, p.chosen_ids) for p in expected]
    data[1]["response_j"] = ""
    path.write_text(jsonl(data))
    with pytest.raises(DataError, match=r"line 2, field 'response_j': text is empty.*data.columns: question -> prompt"):
        load_pairs([path], tok, cfg(columns=columns))
    parquet = tmp_path / "se.parquet"
    _write_parquet(parquet, [{k: v for k, v in r.items() if k != "response_k"} for r in data])
    with pytest.raises(DataError, match="no 'response_k' column; data.columns names 'response_j' and 'response_k'"):
        load_pairs([parquet], tok, cfg(columns=columns))


def _as_standard(tmp_path: Path, data: list[dict[str, Any]]) -> Path:
    path = tmp_path / "std.jsonl"
    path.write_text(jsonl([{"prompt": r["question"], "chosen": r["response_j"], "rejected": r["response_k"]} for r in data]))
    return path


def _write_parquet(path: Path, data: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(data), path)


def test_eval_fraction_carve_is_deterministic_disjoint_and_complete(tmp_path: Path, tok: Any) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(jsonl(rows(30, "a")))
    b.write_text(jsonl(rows(11, "b")))
    data = DataConfig(train_files=[str(a), str(b)], eval_files=[], eval_fraction=0.2)
    train, held = data_files(data, seed=7)
    assert (train.part, held.part) == ("train", "eval") and list(train) == list(held) == [str(a), str(b)]
    t_rows, e_rows = train.select([30, 11]), held.select([30, 11])
    assert len(e_rows) == 8 and not set(t_rows) & set(e_rows) and sorted(t_rows + e_rows) == list(range(41))
    assert data_files(data, seed=7)[1].select([30, 11]) == e_rows  # same seed, same split
    assert data_files(data, seed=8)[1].select([30, 11]) != e_rows
    t_pairs, t_sum = load_pairs(train, tok, cfg())
    e_pairs, e_sum = load_pairs(held, tok, cfg())
    assert (len(t_pairs), len(e_pairs)) == (33, 8) and [p.index for p in e_pairs] == list(range(8))
    assert "8 held out as the eval split" in e_sum.render() and "33 left for training" in t_sum.render()


def test_mixture_weights(tmp_path: Path, tok: Any) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(jsonl(rows(10, "a")))
    b.write_text(jsonl(rows(10, "b")))
    files = DataFiles([str(a), str(b)], weights=[2.5, 0.3], seed=1)
    picks = files.select([10, 10])
    assert len(picks) == 25 + 3
    assert all(picks.count(i) in (2, 3) for i in range(10)) and sum(picks.count(i) == 3 for i in range(10)) == 5
    assert len(set(picks) & set(range(10, 20))) == 3 and picks == sorted(picks)
    assert DataFiles([str(a), str(b)], weights=[2.5, 0.3], seed=1).select([10, 10]) == picks
    pairs, summary = load_pairs(files, tok, cfg())
    assert len(pairs) == 28 and [p.index for p in pairs] == list(range(28)) and summary.n_kept == 28
    assert pairs[0].prompt_ids == pairs[1].prompt_ids and pairs[0] is not pairs[1]  # a repeated row
    assert "data.train_weights[1] = 0.3" in summary.render() and "10 rows -> 3" in summary.render()
    assert len(load_pairs(DataFiles([str(a), str(b)], weights=[0, 1]), tok, cfg())[0]) == 10


def test_online_dataset_downloads_only_the_split(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Online: the README first (it resolves the revision to a commit), the file list of that commit,
    then only the split's files, pinned to the commit; cache_dir and local_files_only passed explicitly."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    repo = ["README.md", "data/train-00000-of-00001.jsonl", "data/test-00000-of-00001.jsonl", "big/other.parquet"]
    calls: list[dict[str, Any]] = []

    def fake_snapshot(repo_id: str, **kw: Any) -> str:
        calls.append({"repo_id": repo_id, **kw})
        snap = hub_repo(cache, "dataset", repo_id, {})
        for name in repo[1:]:
            if any(Path(name).match(p) or name == p for p in kw["allow_patterns"]):
                (snap / name).parent.mkdir(parents=True, exist_ok=True)
                (snap / name).write_text(jsonl(rows(2)))
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, **kw: list(repo))
    (path,) = expand_files(["org/online@v1"])
    assert path.name == "train-00000-of-00001.jsonl" and path.is_file()
    assert [c["allow_patterns"] for c in calls] == [["README.md"], ["data/train-00000-of-00001.jsonl"]]
    assert [c["revision"] for c in calls] == ["v1", SHA]
    assert all(c["cache_dir"] == str(cache) and c["local_files_only"] is False for c in calls)
    assert calls[0]["repo_type"] == "dataset"


def test_model_download_patterns(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What is fetched for a model: config/tokenizer/chat-template files and transformers-named
    safetensors; pickle weights only with allow_pickle, code only with trust_remote_code."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    patterns: list[list[str]] = []
    snap = hub_repo(cache, "model", "org/m", {"config.json": "{}", "model.safetensors": b"x"})

    def fake_snapshot(repo_id: str, **kw: Any) -> str:
        patterns.append(kw["allow_patterns"])
        assert kw["repo_type"] == "model" and kw["local_files_only"] is False and kw["cache_dir"] == str(cache)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    resolve_source("org/m")
    resolve_source("org/m", allow_pickle=True, trust_remote_code=True)
    plain, opted = patterns
    for name in ("config.json", "tokenizer*", "chat_template.jinja", "model*.safetensors", "model*.safetensors.index.json"):
        assert name in plain
    assert not any("bin" in p or p.endswith(".py") for p in plain)
    assert "pytorch_model*.bin" in opted and "*.py" in opted
