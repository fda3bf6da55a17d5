"""Shared fixtures: a tiny random Llama folder (built once per session), fast deterministic torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "dpokit" / "assets"
PRESETS = ASSETS / "presets"  # the shipped configs (`dpokit train --preset NAME`)
TOY = ASSETS / "data" / "toy"
REVIEWS = ASSETS / "data" / "reviews"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = config.getoption("--runslow") or os.environ.get("DPOKIT_SLOW") == "1"
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow or DPOKIT_SLOW=1")
    # CUDA-only tests carry the `gpu` marker and are skipped here, not each with its own skipif
    has_cuda = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if not run_slow and "slow" in item.keywords:
            item.add_marker(skip_slow)
        if not has_cuda and item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """dpokit's caches (tokenized pairs, reference log-probs, materialised models) go to a folder of
    this test session, not the user's ~/.cache/dpokit, unless DPOKIT_CACHE is set already."""
    if "DPOKIT_CACHE" not in os.environ:
        os.environ["DPOKIT_CACHE"] = str(tmp_path_factory.mktemp("dpokit_cache"))


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama + the shipped tiny tokenizer, saved as a HF folder."""
    from dpokit.models.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), seed=0)
