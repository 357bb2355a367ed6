"""Root pytest configuration: options, markers by folder, tier skips, seeds, shared fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")           # tests never reach a hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if "SLMQUANT_DATA" not in os.environ and (ROOT.parent / "shared" / "data").is_dir():
    os.environ["SLMQUANT_DATA"] = str(ROOT.parent / "shared" / "data")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run the slow real-model tier")


def pytest_collection_modifyitems(config, items):
    runslow = config.getoption("--runslow")
    cuda = torch.cuda.is_available()
    for item in items:
        parts = Path(str(item.fspath)).parts
        for track in ("track1", "track2", "track3"):
            if any(p.startswith(track + "_") for p in parts):
                item.add_marker(getattr(pytest.mark, track))
        if "slow" in item.keywords and not runslow:
            item.add_marker(pytest.mark.skip(reason="slow real-model tier: pass --runslow"))
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2():
    """The whole bundled SmolLM2-135M in float32 (from the on-disk cache after the first run)."""
    from slmquant.models import load_model
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tok():
    from slmquant.models import smollm2_tokenizer
    return smollm2_tokenizer()
