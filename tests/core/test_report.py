"""`slmquant report`: the tables and the plotted values come from the results they were given."""
from __future__ import annotations

import csv
import json
import math

import pytest

from slmquant.cli import main
from slmquant.report import _plots, build_report, load_groups, plot_names, ppl_interval, write_report
from slmquant.scores import slmq_perf

SOURCE = {"stand_in_for": "HuggingFaceTB/SmolLM2-135M"}
PAPER = {"track1": {"SmolLM2-135M": {"FP16": {"wiki": 15.0}, "smoothquant/w8a8": {"wiki": 16.5, "slmq_perf": 99.0},
                                     "spinquant/w4a8": {"wiki": 18.0}}},
         "track2": {"SmolLM2-135M": {"spinquant/w8a8": {"slmq_infer": 290.1}}},
         "track3": {"SmolLM2-135M": {"omniquant/w8a8": {"slmq_quant": 106.3}}}}
TASKS = ("mmlu_cloze", "arc_challenge", "arc_easy", "piqa", "hellaswag")


def _result(method, bits, nll, cost=None, acc=None, infer=None, model="smollm2-135m", device_class="cpu"):
    r = {"schema": 1, "model": model, "source": SOURCE, "method": method, "bits": bits, "device": "cpu",
         "profile": "smoke", "device_class": device_class, "machine": {"threads": 2, "cpu_capability": "AVX512"},
         "wikitext2": {"ppl": math.exp(sum(nll) / (len(nll) * 2047)), "seqlen": 2048, "window_nll": nll,
                       "n_windows": len(nll), "windows": f"first:{len(nll)}", "n_tokens": 2047 * len(nll)}}
    if cost:
        r["quantization"] = {"cost": {"wall_s": cost[0], "peak_mem_bytes": cost[1]}}
    if acc is not None:          # one accuracy per task of slmq_perf
        for t, a in zip(TASKS, acc):
            r[t] = {"acc_norm": a, "acc_norm_stderr": 0.02, "n_items": 40}
    if infer is not None:        # (prefill speedup, memory ratio, storage ratio, slmq_infer)
        r["infer"] = {"ratios": {"prefill_speedup": infer[0], "decode_speedup": 1.5, "memory": infer[1],
                                 "storage_vs_float16": infer[2]},
                      "float": {"macs": {"total": 4.0e9}, "storage": {"bytes": 2.7e8}},
                      "real": {"macs": {"total": 1.0e9}, "storage": {"bytes": 2.7e8 * infer[2]}},
                      "slmq_infer": infer[3], "slmq_infer_macs": infer[3] + 10}
    return r


FLOAT_ACC = (0.30, 0.28, 0.60, 0.65, 0.40)


@pytest.fixture
def run_folder(tmp_path):
    cells = {"float": _result("none", "w16a16", [6000.0, 6200.0, 6100.0], acc=FLOAT_ACC),
             "rtn-w8a8": _result("rtn", "w8a8", [6100.0, 6300.0, 6150.0], (2.0, 3e8),
                                 acc=(0.29, 0.27, 0.57, 0.64, 0.39), infer=(1.8, 0.6, 0.55, 180.0)),
             "smoothquant-w8a8": _result("smoothquant", "w8a8", [6050.0, 6250.0, 6120.0], (60.0, 5e8)),
             "omniquant-w8a8": _result("omniquant", "w8a8", [6040.0, 6240.0, 6110.0], (600.0, 1.2e9)),
             "spinquant-w8a8": _result("spinquant", "w8a8", [6020.0, 6220.0, 6105.0], (500.0, 3.3e9),
                                       infer=(1.5, 0.7, 0.6, 160.0)),
             "spinquant-w4a8": _result("spinquant", "w4a8", [6400.0, 6600.0, 6500.0], (480.0, 3.3e9))}
    folder = tmp_path / "cpu" / "smollm2-135m"             # the layout `slmquant bench` writes
    folder.mkdir(parents=True)
    for name, r in cells.items():
        (folder / f"{name}.json").write_text(json.dumps(r))
    (folder / "gptq-w8a8.json").write_text('{"model": ')            # torn: skipped, not an error
    old = {k: v for k, v in _result("gptq", "w4a8", [1.0, 1.0]).items() if k != "schema"}
    (folder / "gptq-w4a8.json").write_text(json.dumps(old))           # another (older) schema: skipped
    fl = cells["float"]
    fl["outliers"] = {"layers": [{"layer": i, "weight": {"q_proj": 5.0 + i, "down_proj": 9.0 * (i + 1)},
                                  "act_ratio": {"attn_in": 3.0 + i, "down_in": 40.0 * (i + 1)},
                                  "act_max": {"attn_in": 2.0, "down_in": 100.0 + i}} for i in range(3)]}
    (folder / "float.json").write_text(json.dumps(fl))
    return tmp_path, cells


def test_tables_and_plotted_values_are_the_results(run_folder):
    folder, cells = run_folder
    reps = write_report(folder, PAPER)
    assert len(reps) == 1 and (reps[0]["model"], reps[0]["device_class"]) == ("smollm2-135m", "cpu")
    rep = reps[0]
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
    # slmq_perf from the five accuracies and the perplexity, by the published formula
    r = cells["rtn-w8a8"]
    want = 100 * math.sqrt(sum(x * x for x in [q / f for q, f in zip((0.29, 0.27, 0.57, 0.64, 0.39), FLOAT_ACC)]
                                + [fppl / r["wikitext2"]["ppl"]]) / 6)
    assert rows["rtn-w8a8"]["slmq_perf"] == pytest.approx(want)
    assert want == pytest.approx(slmq_perf({**dict(zip(("mmlu", "arc_c", "arc_e", "piqa", "hellaswag"),
                                                       (0.29, 0.27, 0.57, 0.64, 0.39))), "wiki": r["wikitext2"]["ppl"]},
                                           {**dict(zip(("mmlu", "arc_c", "arc_e", "piqa", "hellaswag"), FLOAT_ACC)),
                                            "wiki": fppl}))
    assert rows["smoothquant-w8a8"]["slmq_perf"] is None                   # no tasks scored: blank
    assert rows["smoothquant-w8a8"]["paper_slmq_perf"] == 99.0
    # track 2: the measured ratios and slmq_infer, the paper's beside
    assert rows["spinquant-w8a8"]["slmq_infer"] == 160.0 and rows["spinquant-w8a8"]["paper_slmq_infer"] == 290.1
    assert rows["rtn-w8a8"]["macs_ratio"] == pytest.approx(0.25) and rows["rtn-w8a8"]["prefill_speedup"] == 1.8
    # slmq_quant over the paper's three methods at W8A8: the costliest in each resource scores 100
    # in it; RTN is not in the set, and W4A8 has only one of the three
    t_max, m_max = 600.0, 3.3e9
    want = 100 * math.sqrt(((t_max / 60.0) ** 2 + (m_max / 5e8) ** 2) / 2)
    assert rows["smoothquant-w8a8"]["slmq_quant"] == pytest.approx(want)
    assert rows["rtn-w8a8"]["slmq_quant"] is None and rows["spinquant-w4a8"]["slmq_quant"] is None
    assert rows["omniquant-w8a8"]["paper_slmq_quant"] == 106.3
    assert rep["plotted"]["cost_vs_accuracy"]["omniquant-w8a8"] == (600.0, rows["omniquant-w8a8"]["ppl_ratio"])
    # Figure 4: the three scores per cell; Figure 3: the per-layer outlier series of the float model
    sc = rep["plotted"]["scores"]
    assert sc["rtn-w8a8"] == (rows["rtn-w8a8"]["slmq_perf"], 180.0, None)
    assert sc["spinquant-w8a8"] == (None, 160.0, rows["spinquant-w8a8"]["slmq_quant"])
    ol = rep["plotted"]["outliers"]
    assert ol["act_ratio"]["down_in"] == [40.0, 80.0, 120.0] and ol["weight"]["q_proj"] == [5.0, 6.0, 7.0]
    # the files say the same
    with open(folder / "track1.csv") as f:
        t1 = {r["cell"]: r for r in csv.DictReader(f)}
    assert float(t1["spinquant-w8a8"]["ppl_ratio"]) == pytest.approx(rows["spinquant-w8a8"]["ppl_ratio"])
    assert float(t1["rtn-w8a8"]["slmq_perf"]) == pytest.approx(rows["rtn-w8a8"]["slmq_perf"])
    assert t1["rtn-w8a8"]["paper_ppl_ratio"] == "" and t1["rtn-w8a8"]["model"] == "smollm2-135m"
    with open(folder / "track2.csv") as f:
        t2 = {r["cell"]: r for r in csv.DictReader(f)}
    assert float(t2["rtn-w8a8"]["slmq_infer"]) == 180.0 and t2["omniquant-w8a8"]["slmq_infer"] == ""
    md = (folder / "report.md").read_text()
    assert f"{rows['spinquant-w4a8']['ppl_ratio']:.4f}" in md and "1.2000" in md and "290.1" in md
    assert f"{rows['rtn-w8a8']['slmq_perf']:.1f}" in md
    import matplotlib.image as mpimg
    for png in plot_names(rep).values():
        assert f"]({png})" in md
        img = mpimg.imread(folder / png)
        assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 0          # a drawn image, not blank


def test_ppl_interval_brackets_the_perplexity_and_needs_two_windows():
    nll = [6000.0, 6200.0, 6100.0]
    lo, hi = ppl_interval(nll, 2047)
    assert lo < math.exp(sum(nll) / (3 * 2047)) < hi
    assert ppl_interval([6000.0], 2047) is None


def test_missing_cells_and_paper_leave_blanks(tmp_path):
    (tmp_path / "rtn-w4a8.json").write_text(json.dumps(_result("rtn", "w4a8", [6300.0, 6500.0], (1.0, 1e8))))
    rep, = write_report(tmp_path, None)                      # no float: tables and plots still written
    assert rep["float"] is None and rep["rows"][0]["ppl_ratio"] is None and rep["rows"][0]["paper_ppl_ratio"] is None
    assert rep["plotted"]["cost_vs_accuracy"] == {} and rep["plotted"]["outliers"] == {}
    assert (tmp_path / plot_names(rep)["ppl_ratio"]).is_file()
    assert not (tmp_path / plot_names(rep)["outliers"]).exists()
    assert plot_names(rep)["outliers"] not in (tmp_path / "report.md").read_text()


def test_cells_of_another_profile_or_windows_are_not_compared_with_float(tmp_path):
    fl = _result("none", "w16a16", [6000.0, 6200.0])
    other = {**_result("rtn", "w8a8", [6100.0, 6300.0]), "profile": "quick"}
    bigger = _result("gptq", "w8a8", [6100.0, 6300.0, 6200.0])
    rep = build_report({"float": fl, "rtn-w8a8": other, "gptq-w8a8": bigger}, None)
    assert all(x["ppl_ratio"] is None and x["ppl_ratio_ci"] is None for x in rep["rows"])


def test_results_without_track_1_still_fill_tables_2_and_3():
    """`slmquant bench --tracks 2,3`: no perplexity, yet the inference and cost rows are there."""
    fl = _result("none", "w16a16", [6000.0, 6200.0])
    only23 = {k: v for k, v in _result("rtn", "w8a8", [1.0], (2.0, 3e8), infer=(1.8, 0.6, 0.55, 180.0)).items()
              if k != "wikitext2"}
    row, = build_report({"float": fl, "rtn-w8a8": only23}, None)["rows"]
    assert row["ppl"] is None and row["ppl_ratio"] is None and row["slmq_infer"] == 180.0 and row["quant_s"] == 2.0


def test_slmq_quant_needs_the_three_default_cells_built_on_one_machine():
    cells = {"float": _result("none", "w16a16", [6000.0, 6200.0]),
             "smoothquant-w8a8": _result("smoothquant", "w8a8", [6050.0, 6250.0], (60.0, 5e8)),
             "omniquant-w8a8": _result("omniquant", "w8a8", [6040.0, 6240.0], (600.0, 1.2e9)),
             "spinquant-w8a8": _result("spinquant", "w8a8", [6020.0, 6220.0], (500.0, 3.3e9)),
             "smoothquant-w8a8-alpha=0.8": _result("smoothquant", "w8a8", [6050.0, 6250.0], (6000.0, 9e9))}
    rows = {x["cell"]: x for x in build_report(cells, PAPER)["rows"]}
    assert rows["smoothquant-w8a8"]["slmq_quant"] == pytest.approx(100 * math.sqrt((10.0 ** 2 + 6.6 ** 2) / 2))
    assert rows["smoothquant-w8a8-alpha=0.8"]["slmq_quant"] is None        # an ablation is not the method's row
    assert rows["smoothquant-w8a8-alpha=0.8"]["paper_ppl_ratio"] is None and rows["smoothquant-w8a8"]["paper_ppl_ratio"]
    cells["omniquant-w8a8"]["machine"] = {"threads": 64, "cpu_capability": "AVX512"}   # built elsewhere
    rows = {x["cell"]: x for x in build_report(cells, PAPER)["rows"]}
    assert all(rows[c]["slmq_quant"] is None for c in ("smoothquant-w8a8", "omniquant-w8a8", "spinquant-w8a8"))


def test_the_report_names_every_machine_that_measured_a_track():
    """One machine: one line. A folder resumed on another machine: each machine with what it
    measured, per track where the result keeps per-track machines, else per result."""
    from slmquant.report import markdown_group
    here, there = {"threads": 2, "cpu_capability": "AVX2"}, {"threads": 2, "cpu_capability": "AVX512"}
    cells = {"float": _result("none", "w16a16", [6000.0, 6200.0]),
             "rtn-w8a8": _result("rtn", "w8a8", [6100.0, 6300.0], (2.0, 3e8))}
    for r in cells.values():
        r["tracks_done"], r["track_machines"] = [1], {"1": there}
    text = markdown_group({**build_report(cells, None), "drawn": {}})
    assert "Measured with 2 torch thread(s), CPU capability AVX512," in text and "AVX2" not in text
    cells["rtn-w8a8"].update(tracks_done=[1, 3], track_machines={"1": there, "3": here}, machine=here)
    legacy = _result("gptq", "w8a8", [6100.0, 6300.0])      # written before per-track records
    cells["gptq-w8a8"] = {**legacy, "tracks_done": [1, 2], "machine": here}
    lines = markdown_group({**build_report(cells, None), "drawn": {}}).splitlines()
    assert "Measured with" not in "\n".join(lines)
    avx2, = (x for x in lines if "CPU capability AVX2" in x)
    avx512, = (x for x in lines if "CPU capability AVX512" in x)
    assert avx2.endswith(": rtn-w8a8 track 3, gptq-w8a8 (its last run).")
    assert avx512.endswith(": float track 1, rtn-w8a8 track 1.")


def test_the_cost_plot_draws_an_ablation_cell_beside_the_methods(tmp_path):
    """A cell with settings in its name (an ablation) has its own point, labelled by its name, in its
    width's panel (the plot once read the width from the name's last part and failed on it)."""
    import matplotlib.image as mpimg
    cells = {"float": _result("none", "w16a16", [6000.0, 6200.0]),
             "smoothquant-w8a8": _result("smoothquant", "w8a8", [6050.0, 6250.0], (60.0, 5e8)),
             "smoothquant-w8a8-alpha=0.8": _result("smoothquant", "w8a8", [6050.0, 6250.0], (6000.0, 9e9))}
    rep = build_report(cells, PAPER)
    assert set(rep["plotted"]["cost_vs_accuracy"]) == {"smoothquant-w8a8", "smoothquant-w8a8-alpha=0.8"}
    _plots(rep, tmp_path)
    assert mpimg.imread(tmp_path / plot_names(rep)["cost_vs_accuracy"]).shape[0] > 100


def test_mmlu_is_compared_in_one_form_only():
    """A cell scored on mmlu_cloze is never divided by a float scored on lm-eval's letter form."""
    fl = _result("none", "w16a16", [6000.0, 6200.0], acc=FLOAT_ACC)
    fl["mmlu"] = fl.pop("mmlu_cloze")
    q = _result("rtn", "w8a8", [6100.0, 6300.0], acc=(0.29, 0.27, 0.57, 0.64, 0.39))
    row, = build_report({"float": fl, "rtn-w8a8": q}, None)["rows"]
    assert "mmlu" not in row and row["slmq_perf"] is None and row["arc_e"] == 0.57


def test_parts_of_a_matrix_merge_and_device_classes_stay_apart(run_folder):
    """Two machines' folders copied into one: each (model, device class) is its own report, and a
    GPU's cells are never compared with the CPU's float."""
    folder, cells = run_folder
    gpu = folder / "nvidia-h200" / "smollm2-135m"
    gpu.mkdir(parents=True)
    (gpu / "rtn-w8a8.json").write_text(json.dumps({**cells["rtn-w8a8"], "device_class": "nvidia-h200",
                                                   "device": "cuda:0"}))
    qwen = folder / "cpu" / "qwen2.5-0.5b"
    qwen.mkdir(parents=True)
    (qwen / "float.json").write_text(json.dumps(_result("none", "w16a16", [7000.0, 7100.0], model="qwen2.5-0.5b")))
    groups = load_groups(folder)
    assert set(groups) == {("cpu", "smollm2-135m"), ("nvidia-h200", "smollm2-135m"), ("cpu", "qwen2.5-0.5b")}
    reps = {(r["device_class"], r["model"]): r for r in write_report(folder, PAPER)}
    assert reps[("nvidia-h200", "smollm2-135m")]["rows"][0]["ppl_ratio"] is None     # no float of its own
    assert reps[("cpu", "qwen2.5-0.5b")]["rows"] == []
    md = (folder / "report.md").read_text()
    assert "smollm2-135m on nvidia-h200" in md and "qwen2.5-0.5b on cpu" in md


def test_report_command(run_folder, capsys, tmp_path_factory):
    folder, _ = run_folder
    assert main(["report", str(folder), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"report.md", "track1.csv", "track2.csv", "track3.csv", "smollm2-135m-cpu-ppl_ratio.png",
            "smollm2-135m-cpu-scores.png", "smollm2-135m-cpu-outliers.png"} <= set(out["files"])
    empty = tmp_path_factory.mktemp("empty")
    assert main(["report", str(empty)]) == 2 and "no results" in capsys.readouterr().err
    assert main(["report", str(empty / "nope")]) == 2


def test_readme_section_is_replaced_by_the_report(run_folder, tmp_path_factory):
    from slmquant.errors import SlmquantError
    from slmquant.report import README_BEGIN, README_END, update_readme
    folder, _ = run_folder
    reps = write_report(folder, PAPER)
    readme = tmp_path_factory.mktemp("repo") / "README.md"
    readme.write_text(f"# x\n\n## Results\n{README_BEGIN}\nold\n{README_END}\n\n## After\n")
    assert update_readme(readme, reps, folder) is True
    text = readme.read_text()
    assert "old" not in text and text.endswith("## After\n") and "#### Track 1: accuracy" in text
    assert f"{reps[0]['rows'][0]['ppl_ratio']:.4f}" in text and "-cpu-ppl_ratio.png)" in text
    assert update_readme(readme, reps, folder) is False            # regenerated: nothing changes
    readme.write_text("# no section\n")
    with pytest.raises(SlmquantError, match="no generated section"):
        update_readme(readme, reps, folder)


def test_readme_results_section_is_the_report_of_the_committed_results():
    """The README's results section is what `slmquant report docs/results --readme README.md`
    writes from the committed results: regenerate it with that command when they change."""
    from pathlib import Path

    from slmquant.cli import _paper_or_none
    from slmquant.report import build_all, readme_section
    root = Path(__file__).resolve().parents[2]
    paper = _paper_or_none()
    if paper is None:
        pytest.skip("the paper's tables (../shared/reference) are not here: the section shows them")
    reps = build_all(root / "docs" / "results", paper)
    assert reps and all(r["float"] and r["rows"] for r in reps)
    assert readme_section(reps, "docs/results") in (root / "README.md").read_text()


def test_a_zero_accuracy_leaves_its_ratio_and_slmq_perf_blank(tmp_path):
    """On a handful of items an accuracy of 0 happens: its ratio and slmq_perf are undefined, blank."""
    fl = _result("none", "w16a16", [6000.0, 6200.0], acc=(0.0, 0.5, 0.5, 0.5, 0.5))
    q = _result("rtn", "w8a8", [6100.0, 6300.0], acc=(0.5, 0.5, 0.5, 0.5, 0.5))
    row, = build_report({"float": fl, "rtn-w8a8": q}, None)["rows"]
    assert row["mmlu_ratio"] is None and row["slmq_perf"] is None and row["arc_e_ratio"] == 1.0
