"""`slmquant report`: the tables and the plotted values come from the results they were given."""
from __future__ import annotations

import csv
import json
import math

import pytest

from slmquant.cli import main
from slmquant.report import build_report, load_results, ppl_interval, write_report

SOURCE = {"stand_in_for": "HuggingFaceTB/SmolLM2-135M"}
PAPER = {"track1": {"SmolLM2-135M": {"FP16": {"wiki": 15.0}, "smoothquant/w8a8": {"wiki": 16.5},
                                     "spinquant/w4a8": {"wiki": 18.0}}}}


def _result(method, bits, nll, cost=None, acc=None):
    r = {"model": "smollm2-135m", "source": SOURCE, "method": method, "bits": bits, "device": "cpu",
         "wikitext2": {"ppl": math.exp(sum(nll) / (len(nll) * 2047)), "seqlen": 2048, "window_nll": nll,
                       "n_windows": len(nll), "windows": f"first:{len(nll)}"}}
    if cost:
        r["quantization"] = {"cost": {"wall_s": cost[0], "peak_mem_bytes": cost[1]}}
    if acc is not None:
        r["arc_easy"] = {"acc_norm": acc, "acc_norm_stderr": 0.02}
    return r


@pytest.fixture
def run_folder(tmp_path):
    cells = {"float": _result("none", "w16a16", [6000.0, 6200.0, 6100.0], acc=0.60),
             "rtn-w8a8": _result("rtn", "w8a8", [6100.0, 6300.0, 6150.0], (2.0, 3e8), acc=0.57),
             "smoothquant-w8a8": _result("smoothquant", "w8a8", [6050.0, 6250.0, 6120.0], (60.0, 5e8)),
             "omniquant-w8a8": _result("omniquant", "w8a8", [6040.0, 6240.0, 6110.0], (600.0, 1.2e9)),
             "spinquant-w8a8": _result("spinquant", "w8a8", [6020.0, 6220.0, 6105.0], (500.0, 3.3e9)),
             "spinquant-w4a8": _result("spinquant", "w4a8", [6400.0, 6600.0, 6500.0], (480.0, 3.3e9))}
    for name, r in cells.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    (tmp_path / "gptq-w8a8.json").write_text('{"model": ')            # torn: skipped, not an error
    return tmp_path, cells


def test_tables_and_plotted_values_are_the_results(run_folder):
    folder, cells = run_folder
    rep = write_report(folder, PAPER)
    rows = {x["cell"]: x for x in rep["rows"]}
    assert set(rows) == set(cells) - {"float"}
    fppl = cells["float"]["wikitext2"]["ppl"]
    for name, x in rows.items():
        assert x["ppl"] == cells[name]["wikitext2"]["ppl"]
        assert x["ppl_ratio"] == pytest.approx(cells[name]["wikitext2"]["ppl"] / fppl)
        assert rep["plotted"]["ppl_ratio"][name] == (x["ppl_ratio"], x["paper_ppl_ratio"])
    assert [x["cell"] for x in rep["rows"]] == ["rtn-w8a8", "smoothquant-w8a8", "omniquant-w8a8",
                                                 "spinquant-w8a8", "spinquant-w4a8"]       # the paper's order
    lo, hi = rows["rtn-w8a8"]["ppl_ratio_ci"]            # paired: narrower than the perplexities' own
    p_lo, p_hi = rows["rtn-w8a8"]["ppl_ci"]
    assert lo < rows["rtn-w8a8"]["ppl_ratio"] < hi and hi / lo < (p_hi / p_lo) ** 0.5
    assert rows["smoothquant-w8a8"]["paper_ppl_ratio"] == pytest.approx(1.1)
    assert rows["spinquant-w4a8"]["paper_ppl_ratio"] == pytest.approx(1.2)
    assert rows["rtn-w8a8"]["paper_ppl_ratio"] is None                     # not in the paper: blank
    assert rows["rtn-w8a8"]["arc_e"] == 0.57 and rows["rtn-w8a8"]["arc_e_ratio"] == pytest.approx(0.95)
    # slmq_quant over the paper's three methods at W8A8: the costliest in each resource scores 100
    # in it; RTN is not in the set, and W4A8 has only one of the three
    t_max, m_max = 600.0, 3.3e9
    want = 100 * math.sqrt(((t_max / 60.0) ** 2 + (m_max / 5e8) ** 2) / 2)
    assert rows["smoothquant-w8a8"]["slmq_quant"] == pytest.approx(want)
    assert rows["rtn-w8a8"]["slmq_quant"] is None and rows["spinquant-w4a8"]["slmq_quant"] is None
    assert rep["plotted"]["cost_vs_accuracy"]["omniquant-w8a8"] == (600.0, rows["omniquant-w8a8"]["ppl_ratio"])
    # the files say the same
    with open(folder / "track1.csv") as f:
        t1 = {r["cell"]: r for r in csv.DictReader(f)}
    assert float(t1["spinquant-w8a8"]["ppl_ratio"]) == pytest.approx(rows["spinquant-w8a8"]["ppl_ratio"])
    assert t1["rtn-w8a8"]["paper_ppl_ratio"] == ""
    md = (folder / "report.md").read_text()
    assert f"{rows['spinquant-w4a8']['ppl_ratio']:.4f}" in md and "1.2000" in md
    import matplotlib.image as mpimg
    for png in ("ppl_ratio.png", "cost_vs_accuracy.png"):
        img = mpimg.imread(folder / png)
        assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 0          # a drawn image, not blank


def test_ppl_interval_brackets_the_perplexity_and_needs_two_windows():
    nll = [6000.0, 6200.0, 6100.0]
    lo, hi = ppl_interval(nll, 2047)
    assert lo < math.exp(sum(nll) / (3 * 2047)) < hi
    assert ppl_interval([6000.0], 2047) is None


def test_missing_cells_and_paper_leave_blanks(tmp_path):
    (tmp_path / "rtn-w4a8.json").write_text(json.dumps(_result("rtn", "w4a8", [6300.0, 6500.0], (1.0, 1e8))))
    rep = write_report(tmp_path, None)                           # no float: tables and plots still written
    assert rep["float"] is None and rep["rows"][0]["ppl_ratio"] is None and rep["rows"][0]["paper_ppl_ratio"] is None
    assert rep["plotted"]["cost_vs_accuracy"] == {} and (tmp_path / "ppl_ratio.png").is_file()


def test_cells_of_another_profile_or_model_are_not_compared_with_float(tmp_path):
    fl = _result("none", "w16a16", [6000.0, 6200.0])
    other = {**_result("rtn", "w8a8", [6100.0, 6300.0]), "profile": "smoke"}
    bigger = _result("gptq", "w8a8", [6100.0, 6300.0, 6200.0])
    rep = build_report({"float": fl, "rtn-w8a8": other, "gptq-w8a8": bigger}, None)
    assert all(x["ppl_ratio"] is None and x["ppl_ratio_ci"] is None for x in rep["rows"])


def test_report_command(run_folder, capsys, tmp_path_factory):
    folder, _ = run_folder
    assert main(["report", str(folder), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"report.md", "track1.csv", "track3.csv", "ppl_ratio.png", "cost_vs_accuracy.png"} <= set(out["files"])
    empty = tmp_path_factory.mktemp("empty")
    assert main(["report", str(empty)]) == 2 and "no results" in capsys.readouterr().err
    assert main(["report", str(empty / "nope")]) == 2


def test_readme_section_is_replaced_by_the_report(run_folder, tmp_path_factory):
    from slmquant.errors import SlmquantError
    from slmquant.report import README_BEGIN, README_END, update_readme
    folder, _ = run_folder
    rep = write_report(folder, PAPER)
    readme = tmp_path_factory.mktemp("repo") / "README.md"
    readme.write_text(f"# x\n\n## Results\n{README_BEGIN}\nold\n{README_END}\n\n## After\n")
    assert update_readme(readme, rep, folder) is True
    text = readme.read_text()
    assert "old" not in text and text.endswith("## After\n") and "### Track 1: accuracy" in text
    assert f"{rep['rows'][0]['ppl_ratio']:.4f}" in text and "/ppl_ratio.png)" in text
    assert update_readme(readme, rep, folder) is False            # regenerated: nothing changes
    readme.write_text("# no section\n")
    with pytest.raises(SlmquantError, match="no generated section"):
        update_readme(readme, rep, folder)
