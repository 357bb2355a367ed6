"""Track 3 (slow tier): every quick cell quantized afresh (not from the cell cache), its wall time
and peak memory measured, and compared with the float model measured in the same test: wall time in
units of one float forward pass over a 2048-token window, peak memory in units of the float model's
tensors. Those ratios, not raw seconds, sit in the snapshot band (time +-35% for a noisy shared
machine); pytest-benchmark records the raw time and memory."""
from __future__ import annotations

import time

import pytest
import torch

from slmquant import evaluate, infer
from slmquant.cells import build
from tests import gates
from tests.matrix import QUICK, cases


def _forward_seconds(model, tok, reps: int = 3) -> float:
    ids = evaluate.wikitext2_tokens(tok)[:2048][None].to(next(model.parameters()).device)
    with torch.no_grad():
        model(ids)                                                    # warm-up
        t0 = time.perf_counter()
        for _ in range(reps):
            model(ids)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


@pytest.mark.parametrize("cell", cases(QUICK))
def test_track3_cell(cell, float_models, baseline, benchmark, request):
    fmodel, tok = float_models(cell.model)
    unit = _forward_seconds(fmodel, tok)
    torch.manual_seed(0)
    _, record = benchmark.pedantic(build, args=(cell, fmodel, tok), rounds=1, iterations=1)
    c = record["cost"]
    ratios = {"time_ratio": c["wall_s"] / unit, "mem_ratio": c["peak_mem_bytes"] / infer.model_bytes(fmodel)}
    benchmark.extra_info.update(ratios, wall_s=c["wall_s"], peak_mem_bytes=c["peak_mem_bytes"], threads=record["threads"],
                                mem_counter=c["mem_counter"], calib_budget=record["calib_budget"],
                                forward_2048_s=unit)
    # the quantized copy lives beside the float model: the peak holds both
    assert ratios["mem_ratio"] > 1.5 and c["wall_s"] > 0
    gates.compare_or_skip(request, cell, {"ratios": ratios, "calib_budget": record["calib_budget"]}, baseline)
