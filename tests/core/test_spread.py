"""The spread tool behind the gate's bands (tests/spread.py), on synthetic runs, and the float
reference the gate scores against."""
import json
import math

import pytest
import torch

from tests import spread


def _cell(kl: float, ppl: float, fppl: float = 10.0, n: int = 4, seqlen: int = 8) -> dict:
    return {"window_kl": [kl * seqlen] * n, "window_nll": [math.log(ppl) * (seqlen - 1)] * n,
            "float_window_nll": [math.log(fppl) * (seqlen - 1)] * n, "seqlen": seqlen, "n_windows": n}


def _run(path, gptq_kl, rtn_kl=0.5):
    doc = {"env": {}, "cells": {"m-rtn-w4a16": _cell(rtn_kl, 20.0), "m-gptq-w4a16-calib_samples=16": _cell(gptq_kl, 15.0)}}
    path.write_text(json.dumps(doc))
    return path


def test_spreads_are_the_largest_deviation_from_the_base_run(tmp_path):
    runs = [_run(tmp_path / "base.json", 0.25), _run(tmp_path / "seed1.json", 0.26), _run(tmp_path / "t1.json", 0.245)]
    s = spread.spreads(runs)
    g = s["m-gptq-w4a16-calib_samples=16"]
    assert g["runs"] == 3 and math.isclose(g["kl"]["base"], 0.25) and math.isclose(g["kl"]["dev"], 0.04)
    assert math.isclose(g["damage_ratio"]["base"], 0.5) and math.isclose(g["damage_ratio"]["dev"], 0.04)
    assert math.isclose(g["ppl_ratio"]["base"], 1.5) and g["ppl_ratio"]["dev"] < 1e-12
    assert "damage_ratio" not in s["m-rtn-w4a16"]
    table = spread.table(runs)
    assert "| m-gptq-w4a16-calib_samples=16 | 0.2500 | 4.0% | 8.0% |" in table and "| 0.500 | 4.0% | 8.0% | yes |" in table
    lit = spread.spread_literal(runs)
    assert '"m-gptq-w4a16-calib_samples=16": {"kl": 0.0400, "damage_ratio": 0.0400, "ppl_ratio": 0.0000},' in lit


def test_a_method_inside_the_noise_is_called_so(tmp_path):
    runs = [_run(tmp_path / "a.json", 0.49), _run(tmp_path / "b.json", 0.50)]
    assert "**no**: inside the noise" in spread.table(runs)


def test_float_reference_keeps_the_log_probabilities_of_its_own_pass():
    """The gate's float reference takes its stored log-probabilities from the forward passes that
    give its perplexity: equal to a separate pass, and a model scored against it has its KL."""
    import torch.nn.functional as F

    from slmquant import evaluate
    from slmquant.models import tiny_model
    from tests.gates import FloatReference
    from tests.matrix import Tier
    model, tok = tiny_model("llama", seed=0)
    tier = Tier("t", ("tiny:llama",), 64, 3, None, True)
    ref = FloatReference(model, tok, tier)
    assert sorted(ref.logprobs) == [0, 1, 2]
    for i, _, lg in evaluate.window_logits(model, ref.tokens, 64, range(3)):
        assert torch.equal(ref.logprobs[i], lg[0].log_softmax(-1).half())
    assert ref.result.ppl == evaluate.perplexity(model, ref.tokens, seqlen=64, limit=3, progress=False).ppl
    other, _ = tiny_model("llama", seed=1)
    got = ref.score(other)
    want = sum(F.kl_div(lg[0].log_softmax(-1), ref.logprobs[i].float().log_softmax(-1), log_target=True,
                        reduction="sum").item() for i, _, lg in evaluate.window_logits(other, ref.tokens, 64, range(3)))
    assert got["kl"] == pytest.approx(want / (3 * 64), rel=1e-6) and got["ppl_ratio"] != 1.0


def test_a_stored_float_reference_scores_as_the_computed_one(tmp_path):
    """The xdist workers of one session share the float reference through a file: the worker that
    reads it scores a model exactly as the worker that computed it, without a forward pass."""
    from slmquant.models import tiny_model
    from tests.gates import FloatReference
    from tests.matrix import Tier
    model, tok = tiny_model("llama", seed=0)
    other, _ = tiny_model("llama", seed=1)
    tier, store = Tier("t", ("tiny:llama",), 64, 3, None, True), tmp_path / "ref.pt"
    first = FloatReference(model, tok, tier, store=store)
    assert store.is_file()
    read = FloatReference(None, tok, tier, store=store)              # no model: read, never computed
    assert read.result == first.result and read.score(other) == first.score(other)
