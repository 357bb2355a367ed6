"""Run by test_cache.py under `pytest -n 2`: eight tests ask for two cells of a tiny model."""
import pytest

from slmquant.cells import Cell, CellCache
from slmquant.methods import make_config
from slmquant.models import tiny_model

CELLS = [Cell("tiny-llama", "rtn", make_config("rtn", b)) for b in ("w8a8", "w4a16")]


@pytest.fixture(scope="session")
def fm():
    return tiny_model("llama")


@pytest.mark.parametrize("i", range(8))
def test_probe(i, fm):
    model, tok = fm
    CellCache().get(CELLS[i % 2], model, tok)
