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


@pytest.fixture(scope="session")
def snapshot_ext():
    from tests.baseline import BaselineExtension
    return BaselineExtension


@pytest.fixture
def baseline(snapshot, snapshot_ext):
    """syrupy's snapshot with the tolerance-aware baseline extension."""
    return snapshot.use_extension(snapshot_ext)


@pytest.fixture(scope="session")
def float_models():
    """model alias -> (float model, tokenizer), loaded once per session."""
    from slmquant.models import load_model
    cache = {}

    def get(alias):
        if alias not in cache:
            cache[alias] = load_model(alias)
        return cache[alias]
    return get


@pytest.fixture(scope="session")
def float_ref(float_models):
    """(alias, tier) -> {"tokens", "ppl", "logits"}: the float model scored once per session."""
    from slmquant import evaluate
    cache = {}

    def get(alias, tier):
        key = (alias, tier.name)
        if key not in cache:
            model, tok = float_models(alias)
            tokens = evaluate.wikitext2_tokens(tok)
            logits = {}
            if tier.logits:
                for i, _, lg in evaluate.window_logits(model, tokens, tier.seqlen, range(tier.windows)):
                    logits[i] = lg[0]
            res = evaluate.perplexity(model, tokens, seqlen=tier.seqlen, limit=tier.windows, progress=False)
            cache[key] = {"tokens": tokens, "ppl": res.ppl, "logits": logits}
        return cache[key]
    return get


@pytest.fixture(scope="session")
def quantized(float_models):
    """cell -> (model, record): each cell quantized once, through the on-disk cache that xdist
    workers share (file lock per cell); the last two cells stay in memory."""
    from slmquant.cells import CellCache
    store = CellCache()
    memo: dict = {}

    def get(cell):
        if cell not in memo:
            model, tok = float_models(cell.model)
            while len(memo) >= 2:
                memo.pop(next(iter(memo)))
            memo[cell] = store.get(cell, model, tok)[:2]
        return memo[cell]
    return get
