"""Track 1 gates for every cell of the matrix: perplexity recovery against the float model of the
same run, logit error (default tier), the snapshot band, and a flag on suspicious improvements."""
import pytest

from tests import gates
from tests.matrix import DEFAULT, QUICK, cases


def _measure(cell, tier, quantized, float_ref):
    model, record = quantized(cell)
    ref = float_ref(cell.model, tier)
    metrics = gates.score(model, ref["tokens"], tier, reference=ref["logits"].__getitem__ if tier.logits else None)
    metrics["ppl_ratio"] = metrics["ppl"] / ref["ppl"]
    return metrics, record


@pytest.mark.parametrize("cell", cases(DEFAULT))
def test_cell_gate(cell, quantized, float_ref, baseline):
    metrics, record = _measure(cell, DEFAULT, quantized, float_ref)
    failures = gates.check(cell, metrics, gates.DEFAULT_GATES.get((cell.cfg.scheme, gates.weight_setting(cell)), {}))
    assert {"metrics": metrics, "source": record["source"]["ref"]} == baseline
    gates.expect(cell, failures)


@pytest.mark.parametrize("cell", cases(QUICK))
def test_cell_quick_profile(cell, quantized, float_ref, baseline):
    metrics, record = _measure(cell, QUICK, quantized, float_ref)
    key = (cell.model, cell.cfg.scheme, gates.weight_setting(cell))
    failures = gates.check(cell, metrics, gates.QUICK_GATES.get(key, {}))
    assert {"metrics": metrics, "source": record["source"]["ref"]} == baseline
    gates.expect(cell, failures)
