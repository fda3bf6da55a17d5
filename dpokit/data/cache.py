"""On-disk caches of the data layer: where dpokit's caches live, tokenizer fingerprints, and the
tokenized-pairs cache (`data.cache_tokenized`).

Cache root: ``$DPOKIT_CACHE``, else ``~/.cache/dpokit``; each cache is a folder under it
(``tokenized/`` here, ``ref_logps/`` for `dpokit.models.refcache`).

A tokenized-pairs entry is one safetensors file ``tokenized/<key>.safetensors`` of plain integer
arrays plus a JSON summary in its metadata: no pickle, so loading runs no code. It is written
atomically (temp file + rename), and a file that cannot be read or does not match its key is
ignored with a `TokenCacheWarning` (the caller tokenizes again and overwrites it). The key is a hash
of everything tokenization depends on (`entry_key`): the tokenizer (`tokenizer_fingerprint` plus a
probe of its behaviour), the settings that change the ids, the rows themselves and FORMAT_VERSION.
What the arrays mean is the business of the caller (`dpokit.data.pairs`).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

from dpokit.fileio import atomic_write

__all__ = ["cache_root", "cache_dir", "hash_json", "tokenizer_fingerprint", "entry_key", "entry_path", "load_entry",
           "save_entry", "ignore_entry", "TokenCacheWarning", "FORMAT_VERSION"]

FORMAT_NAME = "dpokit-tokenized-pairs"
FORMAT_VERSION = 1  # bump when the arrays or the tokenization rules change: old entries then miss
# Tokenized with and without special tokens, the probe catches what the fingerprint cannot see
# (add_bos_token / add_eos_token switches, normalizers, pre-tokenizers).
_PROBE = "Hello, World! \u00e9t\u00e9  \t 12345 <|x|>\n\nAssistant: ok"


class TokenCacheWarning(UserWarning):
    """A tokenized-pairs cache file could not be used or written; dpokit tokenizes again."""


def cache_root() -> Path:
    """``$DPOKIT_CACHE``, else ``~/.cache/dpokit``, read now (tests and users may set it late)."""
    root = os.environ.get("DPOKIT_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "dpokit"


def cache_dir(name: str, configured: str | None = None) -> Path:
    """A config key's folder if set, else ``<cache_root>/<name>``."""
    return Path(configured).expanduser() if configured else cache_root() / name


def hash_json(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the vocab, the special tokens and the chat template."""
    specials = {
        name: getattr(tokenizer, name, None)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
    }
    return hash_json({
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special_tokens": sorted(map(str, tokenizer.all_special_tokens)),
        "special_ids": specials,
        "chat_template": getattr(tokenizer, "chat_template", None),
    })


def entry_key(tokenizer: Any, settings: dict[str, Any], rows_digest: str) -> str:
    """The cache key of tokenizing rows with this `rows_digest` under `settings` with `tokenizer`."""
    probe = [list(tokenizer(_PROBE, add_special_tokens=special)["input_ids"]) for special in (True, False)]
    return hash_json({
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "tokenizer_class": type(tokenizer).__name__,
        "probe": probe,
        "settings": settings,
        "rows": rows_digest,
    })[:40]


def entry_path(key: str) -> Path:
    return cache_dir("tokenized") / f"{key}.safetensors"


def save_entry(path: Path, key: str, arrays: dict[str, Any], summary: dict[str, Any]) -> bool:
    """Write `arrays` (numpy) and a JSON `summary` atomically; a failure warns and returns False: a
    read-only cache must not stop a run that already has its tokens."""
    from safetensors.numpy import save_file

    meta = {"format": FORMAT_NAME, "version": str(FORMAT_VERSION), "key": key, "summary": json.dumps(summary)}
    try:
        atomic_write(path, lambda tmp: save_file(arrays, tmp, metadata=meta))
        return True
    except OSError as exc:
        warnings.warn(f"could not write tokenized-pairs cache {path}: {exc}", TokenCacheWarning, stacklevel=2)
        return False


def load_entry(path: Path, key: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(arrays, summary) of a cache entry, or None when there is none; an unreadable entry or one
    written for another key is ignored with a TokenCacheWarning."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            arrays = {name: f.get_tensor(name) for name in f.keys()}
        problem = ""
        if meta.get("format") != FORMAT_NAME or meta.get("version") != str(FORMAT_VERSION):
            problem = f"format {meta.get('format')!r} version {meta.get('version')!r}"
        elif meta.get("key") != key:
            problem = "its key does not match its name"
        summary = json.loads(meta.get("summary", "{}"))
    except Exception as exc:  # any failure to parse means "not a usable cache"
        problem = f"unreadable ({type(exc).__name__}: {exc})"
    if problem:
        ignore_entry(path, problem)
        return None
    return arrays, summary


def ignore_entry(path: Path, problem: str) -> None:
    """Warn that the entry at `path` is not used (the caller tokenizes again and overwrites it)."""
    warnings.warn(f"ignoring tokenized-pairs cache {path}: {problem}; tokenizing again", TokenCacheWarning, stacklevel=3)
