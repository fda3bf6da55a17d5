"""`dpokit export` (dpokit/models/export.py) on the tiny random Llama: the GGUF file loads back in
transformers (`from_pretrained(dir, gguf_file=...)`) with the exported model's logits and tokenizer.

Tolerances, against the float32 model (logits of size ~0.6): f16 weights 2e-3 absolute (measured
~3e-4), q8_0 weights 3e-2 (measured ~7e-3). Against the model with its weights rounded to f16 the
f16 file must agree to 1e-5: any mapping error (a q/k permutation, a swapped tensor) is far larger.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dpokit.cli import main
from dpokit.errors import ModelError
from dpokit.models.export import write_gguf

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

TOLERANCE = {"f16": 2e-3, "q8_0": 3e-2}
TEXTS = ["the movie was great, I loved it", "  two leading spaces", "digits 12345 and accents: café, ünïcode 🎉",
         "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>"]  # fmt: skip


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _load_gguf(path: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tok


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_export_round_trip(tiny_model_dir: Path, tmp_path: Path, qtype: str) -> None:
    out = tmp_path / f"tiny-{qtype}.gguf"
    assert main(["export", str(tiny_model_dir), "--gguf", str(out), "--type", qtype]) == 0
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model, tok = _load_gguf(out)
    assert not model.config.tie_word_embeddings and model.config.num_key_value_heads == 2

    ids = torch.tensor([ref_tok(" ".join(TEXTS))["input_ids"][:48]])
    expected = _logits(ref, ids)
    assert (_logits(model, ids) - expected).abs().max() < TOLERANCE[qtype]
    if qtype == "f16":  # exact up to the rounding of the weights
        with torch.no_grad():
            for p in ref.parameters():
                p.copy_(p.half().float())
        torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), atol=1e-5, rtol=1e-5)

    for text in TEXTS:  # the tokenizer round trip
        assert tok(text)["input_ids"] == ref_tok(text)["input_ids"], text
        assert tok.decode(tok(text)["input_ids"]) == text
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == (ref_tok.eos_token, ref_tok.pad_token, None)
    assert tok.chat_template == ref_tok.chat_template

    fields = gguf.GGUFReader(str(out)).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "gpt2"
    want = gguf.LlamaFileType.MOSTLY_F16 if qtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    assert fields["general.file_type"].contents() == want


def test_tied_embeddings_write_no_output_tensor(tmp_path: Path) -> None:
    from dpokit.models.tiny import build_tiny_llama

    folder = build_tiny_llama(tmp_path / "tied", seed=1, hidden_size=32, tie_word_embeddings=True)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    out = write_gguf(ref, tok, tmp_path / "tied.gguf", "f16")
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(str(out)).tensors}
    model, _ = _load_gguf(out)
    assert model.config.tie_word_embeddings
    ids = torch.tensor([[5, 17, 250, 3, 42]])
    assert (_logits(model, ids) - _logits(ref, ids)).abs().max() < TOLERANCE["f16"]


def test_refuses_what_it_cannot_write(tiny_model_dir: Path, tmp_path: Path) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_model_dir))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tok)))
    with pytest.raises(ModelError, match="llama-architecture"):
        write_gguf(gpt2, tok, tmp_path / "x.gguf")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    with pytest.raises(ModelError, match="unknown GGUF type 'q4_0'"):
        write_gguf(ref, tok, tmp_path / "x.gguf", "q4_0")  # type: ignore[arg-type]
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))
