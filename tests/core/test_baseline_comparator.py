import json

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.baseline import BaselineExtension, _round, compare

BASE = {"metrics": {"ppl": 20.0, "ppl_ratio": 1.03, "sqnr_db": 20.0, "kl": 0.04}, "source": "x.gguf"}


def _with(**metrics):
    return {"metrics": {**BASE["metrics"], **metrics}, "source": "x.gguf"}


def test_equal():
    assert compare(BASE, BASE) == []


def test_inside_tolerance():
    assert compare(_with(ppl=20.19, sqnr_db=19.6, kl=0.0435), BASE) == []


def test_outside_tolerance():
    diffs = compare(_with(ppl=20.3, sqnr_db=19.4), BASE)
    assert len(diffs) == 2 and any("/metrics/ppl:" in d for d in diffs) and any("sqnr_db" in d for d in diffs)


def test_missing_key():
    actual = {"metrics": {k: v for k, v in BASE["metrics"].items() if k != "kl"}, "source": "x.gguf"}
    assert compare(actual, BASE) == ["/metrics/kl: missing (baseline has 0.04)"]


def test_new_key():
    assert compare(_with(tokens_s=5.0), BASE) == ["/metrics/tokens_s: new key (not in the baseline)"]


def test_strings_compare_exactly_and_unknown_numbers_tightly():
    assert compare({**BASE, "source": "y.gguf"}, BASE)
    assert compare({"n": 1.0005}, {"n": 1.0}) == [] and compare({"n": 1.01}, {"n": 1.0})


def test_extension_rounds_and_matches_with_tolerance():
    ext = BaselineExtension()
    assert _round({"a": 1.23456789, "b": [2.0000001]}) == {"a": 1.235, "b": [2.0]}
    stored = json.dumps(_round(BASE))
    assert ext.matches(serialized_data=json.dumps(_with(ppl=20.1)), snapshot_data=stored)
    assert not ext.matches(serialized_data=json.dumps(_with(ppl=21.0)), snapshot_data=stored)


def test_quick_gates_combine_rtn_ceiling_and_method_target():
    from slmquant.cells import Cell
    from slmquant.methods import make_config
    from tests import gates
    rtn = gates.QUICK_RTN[("smollm2-135m", "w4a8", "sym")]
    sq = Cell("smollm2-135m", "smoothquant", make_config("smoothquant", "w4a8"))
    assert gates.quick_gates(sq)["max_ppl_ratio"] < rtn                       # must beat RTN
    assert gates.quick_gates(Cell("smollm2-135m", "rtn", make_config("rtn", "w4a8")))["max_ppl_ratio"] > rtn
    sq8 = Cell("smollm2-135m", "smoothquant", make_config("smoothquant", "w8a8"))
    assert gates.quick_gates(sq8)["max_ppl_ratio"] == 1.015
    assert gates.quick_gates(Cell("qwen9", "rtn", make_config("rtn", "w8a8"))) == {}


def test_one_cpu_class_and_an_override(tmp_path, monkeypatch):
    """Every CPU reads baselines/cpu (no per-instruction-set folder); SLMQUANT_BASELINE_DEVICE forces
    the folder (where --snapshot-update writes)."""
    from types import SimpleNamespace

    import tests.baseline as bl
    monkeypatch.setattr(bl, "ROOT", tmp_path)
    monkeypatch.setattr(bl.torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("SLMQUANT_BASELINE_DEVICE", raising=False)
    loc = SimpleNamespace(filepath=str(tmp_path / "tests/track1_accuracy/test_x.py"),
                          methodname="test_gate", nodename="test_gate[a]")
    assert BaselineExtension.dirname(test_location=loc) == str(tmp_path / "baselines/cpu/track1/test_gate")
    monkeypatch.setenv("SLMQUANT_BASELINE_DEVICE", "cpu-other")
    assert BaselineExtension.dirname(test_location=loc) == str(tmp_path / "baselines/cpu-other/track1/test_gate")


def test_nested_metrics_take_their_parents_tolerance():
    """acc_norm nested under task names takes acc_norm's absolute 0.025, not the 0.1% default."""
    from tests.baseline import compare
    base = {"acc_norm": {"arc_easy": 0.400, "piqa": 0.600}}
    assert compare({"acc_norm": {"arc_easy": 0.4083, "piqa": 0.600}}, base) == []        # one item of 120
    assert compare({"acc_norm": {"arc_easy": 0.450, "piqa": 0.600}}, base)


def test_cell_bands_replace_the_default_tolerance():
    ext = BaselineExtension.with_bands({"kl": 0.03})()
    stored = json.dumps({"kl": 0.100})
    assert ext.matches(serialized_data=json.dumps({"kl": 0.1029}), snapshot_data=stored)
    assert not ext.matches(serialized_data=json.dumps({"kl": 0.1031}), snapshot_data=stored)
    assert BaselineExtension.tol["kl"] != ("rel", 0.03)                 # the class itself is unchanged


def test_slow_tier_cells_are_recorded_or_listed_as_not_recorded():
    """Every quick-profile cell has its baseline, or is listed in NOT_RECORDED with its cost; a
    listed cell that has a baseline must leave the list."""
    from tests import gates
    from tests.baseline import ROOT as BROOT
    from tests.baseline import device_class
    from tests.matrix import QUICK, cases
    folder = BROOT / "baselines" / device_class() / "track1" / "test_cell_quick_profile"
    listed = gates.NOT_RECORDED["test_cell_quick_profile"]
    for p in cases(QUICK):
        cid = p.values[0].id
        assert (folder / f"{cid}.json").exists() != (cid in listed), cid
    assert all(cost for entries in gates.NOT_RECORDED.values() for cost in entries.values())


def _gate_cell(method="gptq", bits="w4a16"):
    from slmquant.cells import Cell
    from slmquant.methods import make_config
    over = {} if method == "rtn" else {"calib_samples": 16, "calib_seqlen": 512}
    return Cell("smollm2-135m", method, make_config(method, bits, over))


def test_each_gate_reports_its_own_statistic(monkeypatch):
    from tests import gates
    cell = _gate_cell()
    monkeypatch.setitem(gates.SPREAD, cell.id, {"kl": 0.02, "damage_ratio": 0.02, "ppl_ratio": 0.001})
    rec = {"kl": 0.5, "damage_ratio": 0.6, "ppl_ratio": 1.6}
    assert gates.check_default(cell, dict(rec), rec) == []
    moved = gates.check_default(cell, {**rec, "kl": 0.53}, rec)               # +6% > band 4%
    assert [f.gate for f in moved] == ["damage"] and "+6.0%" in str(moved[0]) and "band +-4.0%" in str(moved[0])
    to_rtn = gates.check_default(cell, {**rec, "damage_ratio": 0.99}, rec)
    assert {f.gate for f in to_rtn} == {"vs_rtn"} and len(to_rtn) == 2       # the band, and must beat RTN
    noop = gates.check_default(cell, {"kl": 0.0, "damage_ratio": 0.0, "ppl_ratio": 1.0}, rec)
    assert {f.gate for f in noop} >= {"suspicious", "damage"}
    from dataclasses import replace
    unmeasured = replace(_gate_cell("rtn", "w8a8"), model="another-model")
    assert [f.gate for f in gates.check_default(unmeasured, {"kl": 0.1, "ppl_ratio": 1.0}, None)] == ["band"]


def test_lower_bounds_report_only_the_failures_they_prove(monkeypatch):
    """A mutation's scoring stops once its KL provably exceeds the smallest ceiling of the gates meant
    to see it (gates.damage_ceiling); the partial metrics (lower bounds) fail those gates and no
    gate that a lower bound cannot decide (suspicious, ppl, a value below its band)."""
    from tests import gates
    cell = _gate_cell()
    monkeypatch.setitem(gates.SPREAD, cell.id, {"kl": 0.02, "damage_ratio": 0.02, "ppl_ratio": 0.001})
    rec = {"kl": 0.5, "damage_ratio": 0.6, "ppl_ratio": 1.6}
    twin = rec["kl"] / rec["damage_ratio"]
    assert gates.damage_ceiling(cell, rec, twin, frozenset({"damage"})) == 0.5 * 1.04 * (1 + 1e-9)
    assert gates.damage_ceiling(cell, rec, twin, frozenset({"vs_rtn"})) == twin * 0.6 * 1.04 * (1 + 1e-9)
    assert gates.damage_ceiling(cell, rec, None, frozenset({"vs_rtn"})) is None
    lower = 0.5 * 1.04 * 1.001
    moved = gates.check_default(cell, {"kl": lower, "damage_ratio": lower / twin, "partial": True, "n_windows": 5},
                                rec)
    assert {f.gate for f in moved} == {"damage", "vs_rtn"} and "lower bound after 5 windows" in str(moved[0])
    small = {"kl": 0.01, "damage_ratio": 0.01 / twin, "partial": True, "n_windows": 1}
    assert gates.check_default(cell, small, rec) == []         # a low lower bound proves nothing
    worse = {"kl": 0.9, "damage_ratio": 0.95}             # recorded worse than RTN: must-beat-RTN is the min
    assert gates.damage_ceiling(cell, worse, 1.0, frozenset({"vs_rtn"})) == 0.96 * (1 + 1e-9)
    rtn_like = {"kl": 0.99 * twin, "damage_ratio": 0.99, "partial": True, "n_windows": 9}
    assert {f.gate for f in gates.check_default(cell, rtn_like, None)} == {"vs_rtn"}   # must beat RTN


@settings(max_examples=300, deadline=None)
@given(kl=st.floats(1e-4, 3.0), ratio=st.floats(0.02, 2.0), spread=st.floats(0.0, 0.2),
       which=st.sampled_from([("damage",), ("vs_rtn",), ("damage", "vs_rtn")]),
       method=st.sampled_from(["gptq", "smoothquant"]))
def test_a_kl_at_the_ceiling_fails_a_gate_it_names(kl, ratio, spread, which, method):
    """Whatever the recorded values and bands: a lower bound that reached damage_ceiling (where the
    mutation battery stops scoring) fails one of the gates the ceiling was taken over."""
    from tests import gates
    cell = _gate_cell(method, "w4a16" if method == "gptq" else "w8a8")   # must beat RTN / need not
    rec, twin = {"kl": kl, "damage_ratio": ratio}, kl / ratio
    old = gates.SPREAD.get(cell.id)
    gates.SPREAD[cell.id] = {"kl": spread, "damage_ratio": spread, "ppl_ratio": 0.0}
    try:
        ceiling = gates.damage_ceiling(cell, rec, twin, frozenset(which))
        m = {"kl": ceiling, "damage_ratio": ceiling / twin, "partial": True, "n_windows": 1}
        assert {f.gate for f in gates.check_default(cell, m, rec)} & set(which)
    finally:
        if old is None:
            del gates.SPREAD[cell.id]
        else:
            gates.SPREAD[cell.id] = old


def test_known_failures_excuse_one_gate_only(monkeypatch):
    import pytest as pt

    from tests import gates
    cell = _gate_cell()
    f = gates.GateFailure(cell.id, "ppl", "ppl_ratio", 1.7, 1.6, 0.01)
    monkeypatch.setitem(gates.KNOWN_FAILURES, ("ppl", cell.id), "known")
    with pt.raises(pt.xfail.Exception):
        gates.expect(cell, [f], {"ppl", "damage"})
    with pt.raises(AssertionError, match="damage"):
        gates.expect(cell, [f, gates.GateFailure(cell.id, "damage", "kl", 1, 0.5, 0.01)], {"ppl", "damage"})
    with pt.raises(AssertionError, match="now passes its ppl gate"):
        gates.expect(cell, [], {"ppl", "damage"})
    gates.expect(cell, [], {"damage"})                 # a gate this test does not evaluate: not stale


def test_rtn_twin_keeps_bits_and_weight_setting():
    from tests import gates
    cell = _gate_cell("gptq", "w4a16")
    twin = gates.rtn_twin(cell)
    assert twin.method == "rtn" and twin.cfg.scheme == "w4a16" and twin.id == "smollm2-rtn-w4a16"
    assert gates.rtn_twin_id("smollm2-gptq-w4a16-calib_samples=16-calib_seqlen=512-group_size=64") == \
        "smollm2-rtn-w4a16-group_size=64"
    # OmniQuant's weights are asymmetric by default: its twin is RTN's asymmetric cell
    omni = _gate_cell("omniquant", "w4a8")
    assert gates.rtn_twin(omni).id == gates.rtn_twin_id(omni.id) == "smollm2-rtn-w4a8-sym=False"


def test_a_device_class_without_baselines_fails_once():
    import os
    import subprocess
    import sys

    from tests.baseline import ROOT as BROOT
    env = {**os.environ, "SLMQUANT_BASELINE_DEVICE": "nvidia-h999-nothing-recorded"}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                        str(BROOT / "tests/core/baseline_probe.py")], cwd=BROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stdout[-2000:]
    assert "1 passed, 1 skipped" in p.stdout and p.stdout.count("no baselines for this device class") == 1
    assert "pytest --snapshot-update" in p.stdout and "baselines/nvidia-h999-nothing-recorded/" in p.stdout


def test_each_xdist_worker_gets_its_own_gpu():
    from tests.baseline import worker_device
    assert worker_device("gw0", 0) == worker_device(None, 0) == "cpu"
    assert [worker_device(f"gw{i}", 4) for i in range(5)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0"]
    assert worker_device(None, 2) == worker_device("master", 2) == "cuda:0"


def test_an_sqnr_floor_without_a_scored_sqnr_fails():
    """The gate scores without the SQNR (sqnr=False): a floor set on it must not pass unseen."""
    from tests import gates
    cell = _gate_cell()
    assert "no SQNR was scored" in " ".join(gates.check(cell, {"ppl_ratio": 1.1, "kl": 0.1}, {"min_sqnr_db": 10}))
    assert gates.check(cell, {"ppl_ratio": 1.1, "sqnr_db": 12.0}, {"min_sqnr_db": 10}) == []
    assert "< floor" in " ".join(gates.check(cell, {"ppl_ratio": 1.1, "sqnr_db": 8.0}, {"min_sqnr_db": 10}))
