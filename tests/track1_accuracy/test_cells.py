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
def test_cell_quick_profile(cell, float_models, quantized, baseline):
    """Whole bundled models on the quick profile's 40 windows of 2048 tokens. The float and cell
    perplexities go through the measurement cache that `scripts/quick_table.py` and the CLI share
    (keyed by the cell's code and settings, the windows and the scoring code): a nightly rerun with
    unchanged code only rereads them."""
    from slmquant import evaluate
    from slmquant.measure import MeasureCache, float_key
    fmodel, tok = float_models(cell.model)
    tokens, store = evaluate.wikitext2_tokens(tok), MeasureCache()
    kw = dict(seqlen=QUICK.seqlen, limit=QUICK.windows, progress=False)
    ref = store.wikitext2(float_key(fmodel), lambda: fmodel, tokens, **kw)
    res = store.wikitext2(cell.key(fmodel.slmquant_source.key), lambda: quantized(cell)[0], tokens, **kw)
    metrics = {"ppl": res["ppl"], "ppl_ratio": res["ppl"] / ref["ppl"]}
    failures = gates.check(cell, metrics, gates.quick_gates(cell))
    assert {"metrics": metrics, "source": fmodel.slmquant_source.ref} == baseline
    gates.expect(cell, failures)
