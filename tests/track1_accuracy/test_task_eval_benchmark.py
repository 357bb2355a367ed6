"""The cost of the pull-request gate's task evaluation: one cell of the whole bundled SmolLM2 (RTN
W8A8, the quantized forward of every W8A8 cell) on the PR-gate samples of the five slmq_perf tasks,
measured fresh (no cached results), recorded by pytest-benchmark:

    .venv/bin/pytest --runslow --benchmark-only tests/track1_accuracy/test_task_eval_benchmark.py

The target (under 5 minutes on a 2-core CPU) is reported in docs/track1_measurements.md with the measured time; the
test asserts what the run produced, not the wall time (shared machines are noisy)."""
from __future__ import annotations

import pytest

from slmquant.profiles import PR_GATE_ITEMS, PR_GATE_TASKS
from slmquant.tasks import TaskSettings, evaluate_tasks
from tests.matrix import QUICK, make_cell


@pytest.mark.slow
@pytest.mark.w8a8
@pytest.mark.rtn
@pytest.mark.smollm2
def test_pr_gate_task_evaluation_of_one_smollm2_cell(benchmark, float_models, quantized, tmp_path, monkeypatch):
    monkeypatch.setenv("SLMQUANT_CACHE", str(tmp_path))        # fresh task folder: documents built too
    cell = make_cell("smollm2-135m", "rtn", "w8a8", {}, QUICK)
    _, tok = float_models(cell.model)
    model = quantized(cell)[0]
    res = benchmark.pedantic(evaluate_tasks, args=(model, tok, list(PR_GATE_TASKS), TaskSettings(limit=PR_GATE_ITEMS)),
                             rounds=1, iterations=1)
    assert all(res[t].n_items == PR_GATE_ITEMS for t in PR_GATE_TASKS)
    benchmark.extra_info.update({"tasks": list(PR_GATE_TASKS), "items_per_task": PR_GATE_ITEMS,
                                 **{t: res[t].acc_norm for t in PR_GATE_TASKS}})
