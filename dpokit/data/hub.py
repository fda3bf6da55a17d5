"""The Hugging Face Hub: models and datasets by id, fetched into (or read from) the Hub cache.

Ids: ``org/name``, optionally with ``@revision`` (a branch, tag or commit sha: ``org/name@main``,
``org/name@0a1b2c...``). Data specs may also say ``hub:org/name`` explicitly; a local path of the
same name always wins (`dpokit.data.files.expand_files` asks the disk first).

Environment, read at call time: huggingface_hub reads its own constants once, at import, so
``cache_dir`` and ``local_files_only`` are always passed explicitly.
    HF_HUB_OFFLINE=1      never download: use what the cache holds (local_files_only=True)
    HF_HUB_CACHE          the cache folder (else $HF_HOME/hub, else ~/.cache/huggingface/hub)
    HF_HUB_ETAG_TIMEOUT   seconds to wait for the Hub's metadata answer (default 10)
    HF_TOKEN              gated or private repos (read by huggingface_hub itself)
A failure raises `HubError` saying which way it failed: offline and not in the cache, or online
and the download failed (repo not found, gated, no such revision, network), with the reason.

Datasets (`dataset_files`): which files make up a split, following the Hub's conventions:
    1. README.md ``configs:`` (``config_name`` = data.subset, ``data_files`` per split, ``data_dir``);
    2. otherwise file and folder names: ``data/train-00000-of-00001.parquet``, ``train.jsonl``,
       ``train/*.parquet``, ``{subset}/train-*.parquet``, with the Hub's split keywords (validation:
       valid/val/dev; test: testing/eval/evaluation; train: training);
    3. data files without split names are one "train" split.
Only the chosen split's files are downloaded. dpokit reads .parquet, .jsonl, .json and .csv files.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpokit.errors import DpokitError

__all__ = ["HubError", "HubRef", "parse_hub_id", "hub_offline", "hub_cache_dir", "snapshot", "explain_failure",
           "dataset_files", "split_files", "is_dataset_spec", "DATA_EXTENSIONS", "SPLIT_KEYWORDS"]

DATA_EXTENSIONS = (".parquet", ".jsonl", ".json", ".csv")  # what dpokit.data.files reads
# The Hub's split keywords (as datasets infers splits from file names).
SPLIT_KEYWORDS: dict[str, tuple[str, ...]] = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")  # data/train-00000-of-00003.parquet
_WORD_SEP = re.compile(r"[-._ 0-9/]+")


class HubError(DpokitError):
    """A Hub model or dataset could not be used; the message says why and what to do."""


@dataclass(frozen=True)
class HubRef:
    repo_id: str  # org/name
    revision: str | None = None  # as typed; None = the default branch

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


def parse_hub_id(text: str) -> HubRef | None:
    """``org/name`` or ``org/name@revision`` -> HubRef; anything else (paths, globs, aliases) -> None."""
    repo, sep, revision = text.strip().partition("@")
    if not _REPO_ID.fullmatch(repo) or ".." in repo or "--" in repo or (sep and not revision.strip()):
        return None
    return HubRef(repo, revision.strip() or None)


def is_dataset_spec(spec: str) -> bool:
    """A data spec that names a Hub dataset: ``hub:org/name[@rev]``, or ``org/name[@rev]`` whose name
    does not end like a data file (``data/train.jsonl`` that is missing is a typo, not a Hub id)."""
    if spec.startswith("hub:"):
        return True
    ref = parse_hub_id(spec)
    return ref is not None and not ref.repo_id.lower().endswith(DATA_EXTENSIONS)


# ---- environment ------------------------------------------------------------------------------
def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def hub_cache_dir() -> Path:
    """The Hub cache folder, with huggingface_hub's precedence, read now (not at import)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def _etag_timeout() -> float:
    try:
        return float(os.environ.get("HF_HUB_ETAG_TIMEOUT", "10"))
    except ValueError:
        return 10.0


# ---- fetching ---------------------------------------------------------------------------------
def snapshot(ref: HubRef, repo_type: str, allow_patterns: list[str]) -> Path:
    """The snapshot folder of `ref` holding the files matching `allow_patterns`, downloaded into the
    Hub cache unless HF_HUB_OFFLINE is set (then the cache must already hold it). Its name is the
    resolved commit sha."""
    from huggingface_hub import snapshot_download

    offline, cache = hub_offline(), hub_cache_dir()
    try:
        folder = snapshot_download(
            ref.repo_id, repo_type=repo_type, revision=ref.revision, cache_dir=str(cache),
            local_files_only=offline, allow_patterns=allow_patterns, etag_timeout=_etag_timeout(),
        )  # fmt: skip
    except Exception as exc:  # huggingface_hub and httpx raise many types; all mean "not available"
        raise HubError(explain_failure(ref, repo_type, exc, offline, cache)) from exc
    return Path(folder)


def explain_failure(ref: HubRef, repo_type: str, exc: BaseException, offline: bool, cache: Path) -> str:
    """One sentence: which way fetching `ref` failed (offline + not cached, or the download), and why."""
    from huggingface_hub import errors

    what = f"Hub {'dataset' if repo_type == 'dataset' else 'model'} '{ref}'"
    if offline and isinstance(exc, errors.LocalEntryNotFoundError):
        return (
            f"{what} is not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1 forbids downloading; "
            "run once online or unset HF_HUB_OFFLINE"
        )
    url = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{ref.repo_id}"
    if isinstance(exc, errors.GatedRepoError):
        reason = f"the repo is gated: accept its conditions at {url} and log in (`hf auth login` or HF_TOKEN)"
    elif isinstance(exc, errors.RepositoryNotFoundError):
        reason = "repository not found (or private, and no valid token is set: `hf auth login` or HF_TOKEN)"
    elif isinstance(exc, errors.RevisionNotFoundError):
        reason = f"the repository has no revision '{ref.revision}'"
    elif isinstance(exc, errors.IncompleteSnapshotError):
        reason = f"the cached copy is incomplete and the Hub could not complete it: {exc}"
    elif isinstance(exc, errors.LocalEntryNotFoundError):  # online, not cached: the Hub was unreachable
        cause = exc.__cause__ or exc
        reason = f"the Hub could not be reached ({type(cause).__name__}: {_first_line(cause)}); check the network"
    else:
        reason = f"{type(exc).__name__}: {_first_line(exc)}"
    return f"could not download {what} into the Hugging Face cache ({cache}): {reason}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no details"


def _literal(path: str) -> str:
    """An allow pattern (fnmatch) matching exactly `path`, even with [, ], * or ? in its name."""
    return re.sub(r"([\[\]*?])", r"[\1]", path)


# ---- datasets ---------------------------------------------------------------------------------
def dataset_files(spec: str, split: str, subset: str | None) -> list[tuple[Path, str]]:
    """The local files of one split of a Hub dataset, each with the name errors show for it
    (``org/name@<sha12>:data/train-00000-of-00001.parquet``). Downloads only those files."""
    ref = parse_hub_id(spec.removeprefix("hub:"))
    if ref is None:
        raise HubError(f"'{spec}' is not a Hugging Face Hub dataset id (expected org/name or org/name@revision)")
    offline = hub_offline()
    folder = snapshot(ref, "dataset", ["README.md"])  # resolves the revision; README may hold configs
    revision = HubRef(ref.repo_id, folder.name)  # the commit: later calls must see the same files
    if offline:  # what the cache holds of this commit
        names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    else:
        names = _remote_files(revision)
    readme = folder / "README.md"
    chosen = split_files(names, split, subset, _readme_configs(readme) if readme.is_file() else [], str(ref))
    if not offline:
        folder = snapshot(revision, "dataset", [_literal(name) for name in chosen])
    shown = f"{ref.repo_id}@{folder.name[:12]}"
    missing = [name for name in chosen if not (folder / name).is_file()]
    if missing:
        raise HubError(f"Hub dataset '{ref}': {missing[0]} is not in the local copy {folder}")
    return [(folder / name, f"{shown}:{name}") for name in chosen]


def _remote_files(ref: HubRef) -> list[str]:
    from huggingface_hub import HfApi

    try:
        return sorted(HfApi().list_repo_files(ref.repo_id, repo_type="dataset", revision=ref.revision))
    except Exception as exc:  # same failure kinds as a download
        raise HubError(explain_failure(ref, "dataset", exc, False, hub_cache_dir())) from exc


def _readme_configs(readme: Path) -> list[dict[str, Any]]:
    """The ``configs:`` list of a dataset card's YAML header ([] if none or unreadable)."""
    import yaml

    text = readme.read_text(encoding="utf-8", errors="replace")
    match = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if not match:
        return []
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return []  # a broken card should not stop training: fall back to the file-name conventions
    configs = meta.get("configs") if isinstance(meta, dict) else None
    return [c for c in configs if isinstance(c, dict)] if isinstance(configs, list) else []


def split_files(names: list[str], split: str, subset: str | None, configs: list[dict[str, Any]], what: str) -> list[str]:
    """The repo files (paths relative to the repo root) of `split`, see the module docstring."""
    if configs:
        config = _pick_config(configs, subset, what)
        patterns = _config_patterns(config)
        data_dir = str(config.get("data_dir") or "").strip("/")
        if patterns is not None:
            if split not in patterns:
                raise HubError(f"Hub dataset '{what}' has no split '{split}'; its splits: {', '.join(patterns)}")
            regexes = [_glob_regex(f"{data_dir}/{p}" if data_dir else p) for p in patterns[split]]
            chosen = [n for n in names if any(r.fullmatch(n) for r in regexes)]
            return _only_readable(chosen, what, split)
        return _by_names(_under(names, data_dir, what), split, what, data_dir)
    if subset:
        return _by_names(_under(names, subset, what), split, what, subset)
    return _by_names(names, split, what, "")


def _pick_config(configs: list[dict[str, Any]], subset: str | None, what: str) -> dict[str, Any]:
    by_name = {str(c.get("config_name", "default")): c for c in configs}
    if subset is not None:
        if subset not in by_name:
            raise HubError(f"Hub dataset '{what}' has no subset '{subset}'; its subsets: {', '.join(by_name)}")
        return by_name[subset]
    defaults = [c for c in configs if c.get("default")] or ([by_name["default"]] if "default" in by_name else [])
    if defaults or len(configs) == 1:
        return (defaults or configs)[0]
    raise HubError(f"Hub dataset '{what}' has several subsets ({', '.join(by_name)}); choose one with data.subset")


def _config_patterns(config: dict[str, Any]) -> dict[str, list[str]] | None:
    """split -> file patterns of a README config; None when it names only a data_dir."""
    files = config.get("data_files")
    if files is None:
        return None
    if isinstance(files, str):
        return {"train": [files]}
    if isinstance(files, dict):  # {split: pattern(s)}
        return {str(k): [v] if isinstance(v, str) else list(v) for k, v in files.items()}
    out: dict[str, list[str]] = {}
    for item in files:
        if isinstance(item, str):
            out.setdefault("train", []).append(item)
        elif isinstance(item, dict) and "path" in item:
            paths = item["path"]
            out.setdefault(str(item.get("split", "train")), []).extend([paths] if isinstance(paths, str) else paths)
    return out


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """The Hub's data_files globs: ``*`` and ``?`` stay within a folder, ``**`` crosses folders."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        else:
            out.append({"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i])))
            i += 1
    return re.compile("".join(out))


def _under(names: list[str], folder: str, what: str) -> list[str]:
    """The files below `folder` (a subset's folder or a config's data_dir)."""
    if not folder:
        return names
    inside = [n for n in names if n.startswith(f"{folder}/")]
    if not inside:
        folders = sorted({n.split("/")[0] for n in names if "/" in n and n.lower().endswith(DATA_EXTENSIONS)})
        raise HubError(f"Hub dataset '{what}' has no folder '{folder}' (data.subset); its folders: {', '.join(folders) or 'none'}")
    return inside


def _words(name: str) -> list[str]:
    stem = name.rsplit(".", 1)[0] if "." in name.rsplit("/", 1)[-1] else name
    return [w for w in _WORD_SEP.split(stem.lower()) if w]


def _split_of(name: str) -> str | None:
    """The split a file's path names by the Hub's keywords, or None."""
    for word in _words(name):
        for split, keywords in SPLIT_KEYWORDS.items():
            if word in keywords:
                return split
    return None


def _names_split(name: str, split: str) -> bool:
    """Whether the path names `split`: a keyword of it, or its exact name as a folder or file stem."""
    parts = name.split("/")
    stem = _SHARD.sub("", parts[-1].rsplit(".", 1)[0])
    if split in parts[:-1] or stem == split:
        return True
    return split in SPLIT_KEYWORDS and _split_of(name) == split


def _by_names(names: list[str], split: str, what: str, root: str) -> list[str]:
    """Split files by the naming conventions; files without split names are one "train" split."""
    data = [n for n in names if n.lower().endswith(DATA_EXTENSIONS) and not any(p.startswith(".") for p in n.split("/"))]
    data = data or [n for n in names if not n.endswith((".md", ".gitattributes"))]  # for the messages below
    chosen = [n for n in data if _names_split(n.removeprefix(f"{root}/") if root else n, split)]
    if not chosen:
        found = sorted({s for s in map(_split_of, data) if s})
        if not found and split in ("train", *SPLIT_KEYWORDS["train"]):
            chosen = data  # no split names at all: everything is the train split
        else:
            splits = ", ".join(found) if found else "train (its files name no splits)"
            raise HubError(f"Hub dataset '{what}' has no split '{split}'; its splits: {splits}")
    if not root:
        subsets = sorted({n.split("/")[0] for n in chosen if "/" in n} - {"data", split, *SPLIT_KEYWORDS.get(split, ())})
        if len(subsets) > 1:
            raise HubError(f"Hub dataset '{what}' has several subsets ({', '.join(subsets)}); choose one with data.subset")
    return _only_readable(chosen, what, split)


def _only_readable(chosen: list[str], what: str, split: str) -> list[str]:
    readable = [n for n in chosen if n.lower().endswith(DATA_EXTENSIONS)]
    if not readable:
        found = ", ".join(chosen[:5]) or "none"
        raise HubError(
            f"Hub dataset '{what}', split '{split}': no {'/'.join(DATA_EXTENSIONS)} files to read (found: {found})"
        )
    return readable
