"""Precomputed reference log-probs (`reference.precompute: true`) and their on-disk cache.

The DPO reference never changes during training, so its log-probs for every pair can be computed
once, before the first step, and looked up by `batch["pair_index"]` afterwards: no reference
model is kept in memory and each step runs one forward instead of two.

Where the one pass gets its reference (nothing is copied where it can be avoided):
    full fine-tuning, copy    the policy itself, before its first update (it *is* the reference)
    LoRA, copy or adapter     the policy with its adapters disabled (= the base model)
    reference.name_or_path    that model, loaded for the pass and freed right after

Cache files (`<cache_dir>/<key>.safetensors`, one per split) are keyed by a hash of everything
that determines the numbers: the reference weights (every state-dict tensor's bytes), the model
config, the tokenizer (vocab, special tokens, chat template), the tokenized pairs (ids, so the
truncation settings are covered), the weight dtype, the autocast mode, the device type and
FORMAT_VERSION. Files are written atomically (temp file + rename) and read with safetensors, so
loading runs no code; an unreadable or inconsistent file is ignored with a warning and recomputed.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dpokit.config import Config
from dpokit.data.cache import cache_dir, tokenizer_fingerprint
from dpokit.data.cache import hash_json as _hash_json
from dpokit.data.collate import TokenizedPair
from dpokit.dist import Dist
from dpokit.errors import io_reason
from dpokit.fileio import atomic_write
from dpokit.models.inference import inference_batches
from dpokit.models.loading import load_model_and_tokenizer
from dpokit.models.reference import Reference

FORMAT_VERSION = 1
FORMAT_NAME = "dpokit-ref-logps"
SPLITS = ("train", "eval")

# Model-config keys that do not change the reference's numbers (paths, library version,
# inference-only switches); the weight dtype is keyed separately from the actual tensors.
_CONFIG_IGNORED = {"transformers_version", "use_cache", "torch_dtype", "dtype"}


class RefCacheWarning(UserWarning):
    """A cache file could not be used or written; dpokit recomputes and carries on."""


# ---- where caches live ----------------------------------------------------------------------
def resolve_cache_dir(configured: str | None) -> Path:
    """reference.cache_dir, else $DPOKIT_CACHE/ref_logps, else ~/.cache/dpokit/ref_logps."""
    return cache_dir("ref_logps", configured)


# ---- fingerprints ---------------------------------------------------------------------------
# tokenizer_fingerprint and the cache root live in dpokit.data.cache (imported above): the data
# layer's tokenized-pairs cache needs them too and may not import models.
def _reference_state(model: Any) -> list[tuple[str, Tensor]]:
    """(name, tensor) of the weights the reference computes with, named as in the plain model.

    A PEFT model is reduced to its base: LoRA tensors are dropped and PEFT's name wrapping
    (`base_model.model.` prefix, `.base_layer`) removed, so the base with adapters disabled, the
    unloaded copy and the original checkpoint all give the same fingerprint.
    """
    out = []
    for name, tensor in model.state_dict(keep_vars=False).items():
        parts = name.split(".")
        if any(p.startswith("lora_") for p in parts):
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        out.append((name, tensor))
    out.sort(key=lambda item: item[0])  # state-dict order is not part of the model's identity
    return out


def _tensor_digest(tensor: Tensor) -> bytes:
    # sha256 beats blake2b here: it runs on the CPU's SHA extensions (measured ~1.1 GB/s vs
    # ~0.35 GB/s per core), and hashlib releases the GIL, so threads hash tensors in parallel.
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
    h = hashlib.sha256()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(memoryview(raw))
    return h.digest()


def weights_fingerprint(model: Any, workers: int | None = None) -> str:
    """Hash of every weight byte of the reference (see `_reference_state`); no sampling, so
    any change to any weight changes it. Tied tensors are hashed once and recorded by name."""
    state = _reference_state(model)
    first_name: dict[tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype], str] = {}
    unique: list[tuple[str, Tensor]] = []
    links: list[str] = []
    for name, t in state:
        if t.device.type == "meta":
            raise ValueError(f"cannot fingerprint {name}: the tensor is on the meta device (offloaded model)")
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if ident in first_name:
            links.append(f"{name}={first_name[ident]}")
        else:
            first_name[ident] = name
            unique.append((name, t))
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = list(pool.map(_tensor_digest, [t for _, t in unique]))
    h = hashlib.sha256()
    for (name, _), digest in zip(unique, digests):
        h.update(name.encode() + b"\0" + digest)
    h.update("\n".join(links).encode())
    return h.hexdigest()


def model_config_fingerprint(model: Any) -> str:
    """Hash of the architecture config (rope, norms, head sizes ... change logps without weights)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    conf = base.config.to_dict()
    kept = {k: v for k, v in conf.items() if not k.startswith("_") and k not in _CONFIG_IGNORED}
    return _hash_json(kept)


def pairs_fingerprint(pairs: Sequence[TokenizedPair]) -> str:
    """Hash of every pair's token ids, in order (the order is the index the table is keyed by)."""
    import array

    h = hashlib.sha256()
    h.update(str(len(pairs)).encode())
    for p in pairs:
        # lengths first, so the split into prompt / chosen / rejected is part of the hash
        h.update(array.array("q", (len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids))).tobytes())
        for ids in (p.prompt_ids, p.chosen_ids, p.rejected_ids):
            h.update(array.array("q", ids).tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class ReferenceSpec:
    """Everything except the pairs that determines a reference's log-probs."""

    weights: str
    model_config: str
    tokenizer: str
    dtype: str  # dtype of the reference weights
    autocast: str  # "no" or "bf16": the pass runs under the same autocast as training
    device: str  # cuda / cpu / ...: kernels differ in the last bits across device types

    def manifest(self, pairs_hash: str, n_pairs: int) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, **self.__dict__, "pairs": pairs_hash, "n_pairs": n_pairs}

    def key(self, pairs_hash: str, n_pairs: int) -> str:
        return _hash_json(self.manifest(pairs_hash, n_pairs))[:40]


def reference_spec(model: Any, tokenizer: Any, autocast: str, device: torch.device) -> ReferenceSpec:
    dtypes = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point()})
    return ReferenceSpec(
        weights=weights_fingerprint(model),
        model_config=model_config_fingerprint(model),
        tokenizer=tokenizer_fingerprint(tokenizer),
        dtype=",".join(dtypes),
        autocast=autocast,
        device=torch.device(device).type,
    )


# ---- the table --------------------------------------------------------------------------------
def pair_lengths(pairs: Sequence[TokenizedPair]) -> Tensor:
    """(N, 2) long: tokens of prompt+chosen and prompt+rejected, the rows a batch holds per pair."""
    return torch.tensor(
        [(len(p.prompt_ids) + len(p.chosen_ids), len(p.prompt_ids) + len(p.rejected_ids)) for p in pairs],
        dtype=torch.long,
    ).reshape(-1, 2)


@dataclass
class RefTable:
    """Reference log-probs of one split, row i = the pair with TokenizedPair.index i."""

    chosen: Tensor  # (N,) fp32
    rejected: Tensor  # (N,) fp32
    lengths: Tensor  # (N, 2) long, checked against each looked-up batch (catches a wrong table)
    split: str = "train"
    _on_device: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False)
    _calls: int = 0

    def __len__(self) -> int:
        return int(self.chosen.shape[0])

    def lookup(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(ref_chosen_logps, ref_rejected_logps), each (B,) fp32 on the batch's device."""
        index = batch["pair_index"]
        key = str(index.device)
        if key not in self._on_device:  # moved once per device, not per step
            values = torch.stack([self.chosen, self.rejected], dim=1).to(index.device)  # (N, 2)
            self._on_device[key] = (values, self.lengths.to(index.device))
        values, lengths = self._on_device[key]
        # index_select refuses -1 and out-of-range indices (plain indexing would wrap -1)
        picked = values.index_select(0, index)  # (B, 2)
        self._check(batch, lengths.index_select(0, index), index.device)
        return picked[:, 0], picked[:, 1]

    def _check(self, batch: dict[str, Tensor], expected: Tensor, device: torch.device) -> None:
        """The batch's row lengths must be the table's: a train table used for eval pairs, or a
        stale index, fails here instead of silently training against the wrong reference.

        On CPU every batch is checked; on an accelerator the first and every 32nd, because the
        check waits for the device and the loop otherwise never does between log steps.
        """
        self._calls += 1
        if device.type != "cpu" and self._calls != 1 and self._calls % 32:
            return
        mask = batch.get("attention_mask")
        b = expected.shape[0]
        if "score_index" in batch or mask is None or mask.dim() != 2 or mask.shape[0] != 2 * b:
            return  # not the padded [chosen; rejected] layout (packed rows): nothing to compare
        got = mask.sum(dim=1).reshape(2, b).T  # (B, 2)
        if not torch.equal(got, expected):
            raise RuntimeError(
                f"precomputed reference log-probs ({self.split} table) do not match this batch's pairs: "
                "the batch's pair_index does not refer to this split's pairs"
            )


# ---- computing ----------------------------------------------------------------------------------
def compute_table(
    reference: Any,
    pairs: Sequence[TokenizedPair],
    collator: Any,
    batch_size: int,
    dist: Dist,
    split: str = "train",
) -> RefTable:
    """One inference pass (`dpokit.models.inference`) of a live `Reference` over `pairs`.

    With several processes each rank runs its share of the batches and a sum over processes
    assembles the full table everywhere.
    """
    _check_indices(pairs, split)
    lengths = [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    values = torch.zeros(len(pairs), 2, dtype=torch.float32, device=dist.device)
    for _, batch in inference_batches(pairs, lengths, collator, batch_size, dist):
        chosen, rejected = reference.logps(batch)
        # pair_index, not the batch's indices: a packing collator may emit the pairs in another order
        values[batch["pair_index"]] = torch.stack([chosen, rejected], dim=1).float()
    with torch.inference_mode():
        values = dist.reduce_sum(values)
    # clone() outside inference mode gives ordinary tensors, which autograd may later touch
    values = values.cpu().clone()
    return RefTable(values[:, 0].contiguous(), values[:, 1].contiguous(), pair_lengths(pairs), split)


def _check_indices(pairs: Sequence[TokenizedPair], split: str) -> None:
    bad = next((i for i, p in enumerate(pairs) if p.index != i), None)
    if bad is not None:
        raise ValueError(
            f"{split} pair {bad} has index {pairs[bad].index}; reference tables need TokenizedPair.index "
            "== position in the split (as data.load_pairs assigns)"
        )


# ---- the file -----------------------------------------------------------------------------------
def cache_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"{key}.safetensors"


def save_table(path: Path, table: RefTable, manifest: dict[str, Any], key: str) -> bool:
    """Write atomically (temp file in the same folder + rename). Failure warns and returns False:
    a read-only cache must not stop a training run that already has its numbers."""
    from safetensors.torch import save_file

    tensors = {"ref_chosen_logps": table.chosen, "ref_rejected_logps": table.rejected, "lengths": table.lengths}
    meta = {"format": FORMAT_NAME, "version": str(FORMAT_VERSION), "key": key, "split": table.split,
            "manifest": json.dumps(manifest, sort_keys=True)}
    try:
        atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta))
        return True
    except Exception as exc:  # OSError, or safetensors' own error type for a full disk
        reason = io_reason(exc, path)
        if reason is None:
            raise
        warnings.warn(f"could not write the reference cache {path}: {reason}; training goes on with the numbers "
                      "just computed (the next run computes them again)", RefCacheWarning, stacklevel=2)  # fmt: skip
        return False


def load_table(path: Path, key: str, pairs: Sequence[TokenizedPair], split: str) -> RefTable | None:
    """The cached table, or None if there is none; a file that is unreadable or does not match
    `key` / the pairs is ignored with a RefCacheWarning (the caller recomputes and overwrites it)."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        problem = _validate(meta, tensors, key, pairs)
    except Exception as exc:  # any failure to parse means "not a usable cache"
        problem = f"unreadable ({type(exc).__name__}: {exc})"
    if problem:
        warnings.warn(f"ignoring reference cache {path}: {problem}; recomputing", RefCacheWarning, stacklevel=2)
        return None
    return RefTable(tensors["ref_chosen_logps"], tensors["ref_rejected_logps"], tensors["lengths"], split)


def _validate(meta: dict[str, str], tensors: dict[str, Tensor], key: str, pairs: Sequence[TokenizedPair]) -> str:
    if meta.get("format") != FORMAT_NAME or meta.get("version") != str(FORMAT_VERSION):
        return f"format {meta.get('format')!r} version {meta.get('version')!r}, expected {FORMAT_NAME!r} {FORMAT_VERSION}"
    if meta.get("key") != key:
        return "its key does not match the file name"
    n = len(pairs)
    for name in ("ref_chosen_logps", "ref_rejected_logps"):
        t = tensors.get(name)
        if t is None or t.dtype != torch.float32 or tuple(t.shape) != (n,):
            return f"{name} missing or not a ({n},) float32 tensor"
        if not bool(torch.isfinite(t).all()):
            return f"{name} holds non-finite values"
    lengths = tensors.get("lengths")
    if lengths is None or not torch.equal(lengths, pair_lengths(pairs)):
        return "pair lengths do not match the data"
    return ""


# ---- putting it together ------------------------------------------------------------------------
@dataclass
class TableResult:
    table: RefTable | None
    hit: bool
    path: Path
    seconds: float


def obtain_table(
    spec: ReferenceSpec,
    pairs: Sequence[TokenizedPair],
    split: str,
    cache_dir: Path,
    live: Any | None,
    collator: Any,
    batch_size: int,
    dist: Dist,
) -> TableResult:
    """Load the table for (spec, pairs) from the cache, or compute it with `live` and save it (main
    process only). With `live=None` a miss returns table=None (lookup only)."""
    t0 = time.perf_counter()
    pairs_hash = pairs_fingerprint(pairs)
    key = spec.key(pairs_hash, len(pairs))
    path = cache_path(cache_dir, key)
    table = load_table(path, key, pairs, split)
    if dist.world > 1:
        # All ranks must agree: one rank computing (and joining the collective in compute_table)
        # while another found a file that appeared meanwhile would hang the run.
        found = dist.reduce_sum(torch.tensor([float(table is not None)], device=dist.device))
        table = table if int(found.item()) == dist.world else None
    if table is not None:
        return TableResult(table, True, path, time.perf_counter() - t0)
    if live is None:
        return TableResult(None, False, path, time.perf_counter() - t0)
    table = compute_table(live, pairs, collator, batch_size, dist, split)
    if dist.is_main:
        save_table(path, table, spec.manifest(pairs_hash, len(pairs)), key)
    return TableResult(table, False, path, time.perf_counter() - t0)


def describe(split: str, res: TableResult, n_pairs: int, extra: str = "") -> str:
    state = "cache hit" if res.hit else "cache miss, computed"
    return f"reference log-probs [{split}]: {state}, {n_pairs} pairs, {res.seconds:.1f}s{extra}, {res.path}"


@contextlib.contextmanager
def live_reference_for_pass(
    cfg: Config, policy: Any, dtype: torch.dtype, device: torch.device, lm_head_chunk: int
) -> Iterator[tuple[Reference, Any]]:
    """(live Reference, the model whose weights it uses) for the one precompute pass.

    Must be entered before the policy's first update: without reference.name_or_path the
    policy's current weights (or its base, with LoRA) are the reference, so no copy is built.
    A separate reference.name_or_path model lives only inside this block.
    """
    if cfg.reference.name_or_path:
        ref, _ = load_model_and_tokenizer(cfg.reference.name_or_path, cfg, dtype)
        ref.requires_grad_(False)
        ref.to(device).eval()
        try:
            yield Reference("copy", model=ref, lm_head_chunk=lm_head_chunk), ref
        finally:
            del ref
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    elif cfg.lora.enabled:  # copy and adapter modes agree: the base with adapters off
        yield Reference("adapter", policy=policy, lm_head_chunk=lm_head_chunk), policy
    else:  # Reference.logps puts the model in eval mode for the pass and restores train mode
        yield Reference("copy", model=policy, lm_head_chunk=lm_head_chunk), policy


def precompute_references(
    cfg: Config,
    policy: Any,
    tokenizer: Any,
    dtype: torch.dtype,
    splits: dict[str, Sequence[TokenizedPair]],
    collator: Any,
    dist: Dist,
    lm_head_chunk: int,
) -> dict[str, Reference]:
    """A cached `Reference` per non-empty split, computed (or loaded) before training.

    Each split has its own table, so eval batches can never read train log-probs.
    """
    cache_dir = resolve_cache_dir(cfg.reference.cache_dir)
    refs: dict[str, Reference] = {}
    with live_reference_for_pass(cfg, policy, dtype, dist.device, lm_head_chunk) as (live, weights_model):
        t0 = time.perf_counter()
        spec = reference_spec(weights_model, tokenizer, cfg.train.mixed_precision, dist.device)
        hashing = f" (+{time.perf_counter() - t0:.1f}s hashing the reference)"
        for split, pairs in splits.items():
            if not pairs:
                continue
            res = obtain_table(spec, pairs, split, cache_dir, live, collator, cfg.train.eval_batch_size, dist)
            dist.print(describe(split, res, len(pairs), hashing))
            hashing = ""
            refs[split] = Reference("cached", table=res.table)
    return refs


def cached_reference_for_eval(
    reference: Reference,
    tokenizer: Any,
    pairs: Sequence[TokenizedPair],
    cfg: Config,
    collator: Any,
    dist: Dist,
    log: Callable[[str], Any] = print,
) -> Reference:
    """For `dpokit evaluate`: a cached Reference when a cache for exactly this reference + data
    exists (or reference.precompute=true, which computes and writes one); else `reference` as is.
    """
    if reference.mode not in ("copy", "adapter"):
        return reference
    cache_dir = resolve_cache_dir(cfg.reference.cache_dir)
    if not cfg.reference.precompute and not any(cache_dir.glob("*.safetensors")):
        return reference  # nothing to find: skip hashing the weights
    weights_model = reference.model if reference.mode == "copy" else reference.policy
    spec = reference_spec(weights_model, tokenizer, "no", dist.device)  # evaluate() runs without autocast
    live = reference if cfg.reference.precompute else None
    res = obtain_table(spec, pairs, "eval", cache_dir, live, collator, cfg.train.eval_batch_size, dist)
    if res.table is None:
        return reference
    log(describe("eval", res, len(pairs)))
    return Reference("cached", table=res.table)
