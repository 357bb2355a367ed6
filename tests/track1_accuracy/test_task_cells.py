"""Track 1 task cells: every model x method x bits scored on the five slmq_perf tasks, gated on the
paired recovery of acc_norm against the float model of the same run (with a confidence bound from
the number of items) and on the snapshot band.

Default tier: a tiny random llama, a few items per task: it checks that every quantized model goes
through lm-eval offline and that the gate machinery works; random weights score near chance, so
the recovery bounds are wide there and the agreement with float's answers does the gating.
Slow tier: the whole bundled models on the PR-gate samples (the cell gate a pull request runs with
`pytest -m w4a8 --runslow`); the float model's task results are cached once per sample and reused by
every cell."""
from __future__ import annotations

import pytest

from slmquant.profiles import PR_GATE_ITEMS, PR_GATE_TASKS
from slmquant.tasks import TaskSettings
from tests import gates
from tests.matrix import QUICK, TINY, cases

TINY_SETTINGS = TaskSettings(limit=4, batch_size=16)
# tiny llama, 20 items (4 per task), measured over every suite row (RTN, GPTQ, SmoothQuant):
# agreement 1.0 at W8 and 0.95-1.0 at W4; mean |loglikelihood change| per choice 0.0033-0.0036 at W8
# and 0.040-0.058 at W4. Ceilings about 3x the measured values, agreement floors with 1-5 items to spare.
TINY_GATES = {"w8": {"min_agreement": 0.9, "max_abs_dll": 0.01},
              "w4": {"min_agreement": 0.75, "max_abs_dll": 0.15}}


@pytest.fixture(scope="session")
def tiny_float():
    from slmquant.models import tiny_model
    from slmquant.tasks import evaluate_tasks
    model, tok = tiny_model("llama")
    res = evaluate_tasks(model, tok, list(PR_GATE_TASKS), TINY_SETTINGS)
    return model, tok, {t: r.to_dict() for t, r in res.items()}


@pytest.mark.parametrize("cell", cases(TINY))
def test_task_cell_tiny(cell, tiny_float, baseline):
    from slmquant.cells import build
    from slmquant.tasks import evaluate_tasks
    model, tok, ref = tiny_float
    qmodel, _ = build(cell, model, tok)
    res = {t: r.to_dict() for t, r in evaluate_tasks(qmodel, tok, list(PR_GATE_TASKS), TINY_SETTINGS).items()}
    metrics = gates.task_metrics(ref, res, PR_GATE_TASKS)
    assert all(r["n"] == TINY_SETTINGS.limit for r in metrics["tasks"].values())
    floors = {**gates.task_floors(cell), **TINY_GATES["w8" if cell.cfg.w_bits >= 8 else "w4"]}
    assert not gates.check_tasks(cell, metrics, floors)
    assert {k: metrics[k] for k in ("agreement", "mean_abs_dll")} == baseline


@pytest.mark.parametrize("cell", cases(QUICK))
def test_task_cell_pr_gate(cell, float_models, quantized, baseline, request):
    from slmquant.measure import MeasureCache, float_key
    fmodel, tok = float_models(cell.model)
    settings, store = TaskSettings(limit=PR_GATE_ITEMS), MeasureCache()
    ref = store.tasks(float_key(fmodel), lambda: (fmodel, tok), list(PR_GATE_TASKS), settings)
    res = store.tasks(cell.key(fmodel.slmquant_source.key), lambda: (quantized(cell)[0], tok),
                      list(PR_GATE_TASKS), settings)
    metrics = gates.task_metrics(ref, res, PR_GATE_TASKS)
    failures = gates.check_tasks(cell, metrics, gates.task_floors(cell))
    snap = {"acc_norm": {t: res[t]["acc_norm"] for t in PR_GATE_TASKS},
            "recovery": metrics["mean"]["recovery"], "n_items": PR_GATE_ITEMS,
            "source": fmodel.slmquant_source.ref}
    gates.compare_or_skip(request, cell, snap, baseline)
    gates.expect(cell, failures, {"tasks"})


def test_the_gate_fails_a_model_that_lost_its_answers():
    """The recovery gate on a synthetic pair: float right on 60% of 300 items, a 'quantized' model
    right on 30% fails both the task floor and the mean floor; 56% (recovery 0.933, below the
    W8 floor of 0.95) passes: its upper bound, 0.98, is not."""
    from slmquant.cells import Cell
    from slmquant.methods import make_config
    cell = Cell("x", "rtn", make_config("rtn", "w8a8"))
    n = 300
    f = [1 if i % 10 < 6 else 0 for i in range(n)]

    def res(correct):
        return {"arc_easy": {"doc_ids": list(range(n)), "correct_norm": correct, "lls": [[0.0, -1.0]] * n}}

    lost = [1 if i % 10 < 3 else 0 for i in range(n)]
    near = [1 if i % 10 < 6 and i % 25 else 0 for i in range(n)]
    bad = gates.check_tasks(cell, {**gates.task_metrics(res(f), res(lost), ["arc_easy"]), "mean_abs_dll": 1.0},
                            gates.task_floors(cell))
    assert len(bad) == 2 and "arc_easy recovery 0.500" in bad[0]
    ok = gates.task_metrics(res(f), res(near), ["arc_easy"])
    assert ok["tasks"]["arc_easy"]["recovery"] == pytest.approx(168 / 180)
    assert ok["tasks"]["arc_easy"]["upper"] > 0.95 and not gates.check_tasks(cell, {**ok, "mean_abs_dll": 1.0},
                                                                             gates.task_floors(cell))
