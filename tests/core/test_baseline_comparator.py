import json

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


def test_per_isa_baseline_wins_only_where_it_exists(tmp_path, monkeypatch):
    """A cell with a recording for this CPU's instruction set reads it; every other cell falls back to
    baselines/cpu; SLMQUANT_BASELINE_DEVICE forces the folder (where --snapshot-update writes)."""
    from types import SimpleNamespace

    import tests.baseline as bl
    monkeypatch.setattr(bl, "ROOT", tmp_path)
    monkeypatch.setattr(bl, "isa_class", lambda: "cpu-testisa")
    monkeypatch.setattr(bl, "device_class", lambda: "cpu")
    monkeypatch.delenv("SLMQUANT_BASELINE_DEVICE", raising=False)
    loc = lambda cell: SimpleNamespace(filepath=str(tmp_path / "tests/track1_accuracy/test_x.py"),
                                       methodname="test_gate", nodename=f"test_gate[{cell}]")
    own = tmp_path / "baselines/cpu-testisa/track1/test_gate"
    own.mkdir(parents=True)
    (own / "a.json").write_text("{}")
    assert BaselineExtension.dirname(test_location=loc("a")) == str(own)
    assert BaselineExtension.dirname(test_location=loc("b")) == str(tmp_path / "baselines/cpu/track1/test_gate")
    monkeypatch.setenv("SLMQUANT_BASELINE_DEVICE", "cpu-other")
    assert BaselineExtension.dirname(test_location=loc("a")) == str(tmp_path / "baselines/cpu-other/track1/test_gate")
