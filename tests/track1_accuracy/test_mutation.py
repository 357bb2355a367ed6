"""A deliberately broken quantizer must fail the default tier's gate: rounding replaced by flooring."""
import torch

from slmquant import quant
from slmquant.cells import build
from tests import gates
from tests.matrix import DEFAULT, make_cell


def test_flooring_instead_of_rounding_is_caught(monkeypatch, float_models, float_ref):
    cell = make_cell("smollm2-135m", "rtn", "w8a8", {}, DEFAULT)
    model, tok = float_models(cell.model)
    ref = float_ref(cell.model, DEFAULT)
    monkeypatch.setattr(quant, "_round", torch.floor)       # the mutation; built outside the cache
    broken, _ = build(cell, model, tok)
    metrics = gates.score(broken, ref["tokens"], DEFAULT, reference=ref["logits"].__getitem__)
    metrics["ppl_ratio"] = metrics["ppl"] / ref["ppl"]
    failures = gates.check(cell, metrics, gates.DEFAULT_GATES[("w8a8", "sym")])
    assert any("ceiling" in f for f in failures), (metrics, failures)
