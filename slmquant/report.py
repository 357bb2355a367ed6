"""`slmquant report DIR`: the tables and plots of a results folder written by `slmquant run` (one JSON
per cell: `float.json`, `<method>-<bits>.json`), in the layout of the SLMQuant paper's Tables 1 and 4,
with the published values beside ours as ratios to each model's own float baseline.

Written into DIR: `report.md` (the tables), `track1.csv`, `track3.csv`, `ppl_ratio.png` (perplexity
recovery per method x bits, ours beside the paper's) and `cost_vs_accuracy.png` (quantization time
against perplexity ratio). `build_report` returns every number it tabulates or plots, so that a test
can check them against the results it was given. A cell that is missing is a blank row entry, never
an error: parts of a matrix run on different machines merge by copying their files into one folder
(each keeps its device, shown per row).

Confidence intervals: perplexity over W scored windows, exp(mean NLL +- t s / sqrt(W)) from the
spread s of the per-window mean NLL (t: Student's 95% quantile, W - 1 degrees of freedom); a task
accuracy, +- 1.96 of lm-eval's standard error. A cell is compared with the float result only when
both scored the same model on the same windows under the same profile."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from .files import atomic_path, write_text_atomic

# lm-eval task names of slmquant -> the paper's column names
TASK_COLUMNS = {"mmlu_cloze": "mmlu", "mmlu": "mmlu", "arc_challenge": "arc_c", "arc_easy": "arc_e",
                "piqa": "piqa", "hellaswag": "hellaswag"}
PAPER_METHODS = ("smoothquant", "omniquant", "spinquant")      # the paper's slmq_quant set
Z95 = 1.96
# two-sided 95% Student t quantiles by degrees of freedom (few windows: the normal's 1.96 would
# claim more than it has); beyond 30, 1.96
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
       10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101,
       19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052,
       28: 2.048, 29: 2.045, 30: 2.042}


def load_results(folder: Path) -> dict[str, dict]:
    """name -> result for every readable cell JSON of a run folder (unreadable files are skipped)."""
    out = {}
    for p in sorted(Path(folder).glob("*.json")):
        try:
            res = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        w = res.get("wikitext2") if isinstance(res, dict) else None
        if isinstance(w, dict) and {"ppl", "seqlen"} <= set(w) and res.get("model") and res.get("bits"):
            out[p.stem] = res
    return out


def _exp_interval(values: list[float]) -> tuple[float, float] | None:
    """exp of the 95% interval of the mean of `values` (Student t; None under two values)."""
    w = len(values)
    if w < 2:
        return None
    mu = sum(values) / w
    half = T95.get(w - 1, Z95) * math.sqrt(sum((v - mu) ** 2 for v in values) / (w - 1)) / math.sqrt(w)
    return math.exp(mu - half), math.exp(mu + half)


def ppl_interval(window_nll: list[float], tokens_per_window: int) -> tuple[float, float] | None:
    """95% interval of a perplexity from its per-window NLL sums (None under two windows)."""
    return _exp_interval([x / tokens_per_window for x in window_nll])


def ratio_interval(nll: list[float], float_nll: list[float], tokens_per_window: int) -> tuple[float, float] | None:
    """95% interval of a perplexity ratio to float scored on the same windows, from the per-window
    differences of mean NLL (paired: the windows' own difficulty cancels). None under two windows."""
    if len(float_nll) != len(nll):
        return None
    return _exp_interval([(a - b) / tokens_per_window for a, b in zip(nll, float_nll)])


BITS_ORDER = ("w8a8", "w4a8", "w4a16")
METHOD_ORDER = ("rtn", "gptq", "smoothquant", "omniquant", "spinquant")


def _order(row: dict) -> tuple:
    b, m = row["bits"] or "", row["method"] or ""
    return (BITS_ORDER.index(b) if b in BITS_ORDER else len(BITS_ORDER), b,
            METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m)


def _paper_model(result: dict) -> str | None:
    ref = (result.get("source") or {}).get("stand_in_for") or ""
    return ref.split("/")[-1] or None


def build_report(results: dict[str, dict], paper: dict | None) -> dict:
    """Rows of Tables 1 (WikiText-2 and tasks) and 4 (quantization cost) per cell, and the plotted
    values. paper: scores.paper_tables() or None."""
    from .scores import slmq_quant
    fl = results.get("float")
    rows = []

    def comparable(r: dict) -> bool:                 # the same model, windows and profile as float
        a, b = r["wikitext2"], fl["wikitext2"]
        return (r["model"] == fl["model"] and r.get("profile") == fl.get("profile")
                and (a.get("windows"), a["seqlen"], a.get("n_windows")) == (b.get("windows"), b["seqlen"], b.get("n_windows")))
    for name, r in results.items():
        if name == "float":
            continue
        w = r["wikitext2"]
        ref = fl if fl and comparable(r) else None
        row = {"cell": name, "method": r.get("method"), "bits": r.get("bits"), "device": r.get("device"),
               "ppl": w["ppl"], "ppl_ci": ppl_interval(w.get("window_nll", []), w["seqlen"] - 1),
               "ppl_ratio": w["ppl"] / ref["wikitext2"]["ppl"] if ref else None, "paper_ppl_ratio": None,
               "ppl_ratio_ci": ratio_interval(w.get("window_nll", []), ref["wikitext2"].get("window_nll", []),
                                              w["seqlen"] - 1) if ref else None}
        pm = _paper_model(r)
        ptab = ((paper or {}).get("track1") or {}).get(pm or "", {})
        pcell = ptab.get(f"{row['method']}/{row['bits']}")
        if pcell and "FP16" in ptab:
            row["paper_ppl_ratio"] = pcell["wiki"] / ptab["FP16"]["wiki"]
        for task, col in TASK_COLUMNS.items():
            if task in r and ref and task in ref:
                se = r[task].get("acc_norm_stderr")
                row[col] = r[task]["acc_norm"]
                row[col + "_ci"] = Z95 * se if isinstance(se, (int, float)) else 0.0
                row[col + "_ratio"] = r[task]["acc_norm"] / ref[task]["acc_norm"]
        q = (r.get("quantization") or {}).get("cost") or {}
        row["quant_s"], row["quant_peak_bytes"] = q.get("wall_s"), q.get("peak_mem_bytes")
        rows.append(row)
    rows.sort(key=_order)
    # slmq_quant per bits width over the paper's three methods, where all three are present
    for bits in sorted({x["bits"] for x in rows}):
        group = [x for x in rows if x["bits"] == bits and x["method"] in PAPER_METHODS
                 and x["quant_s"] and x["quant_peak_bytes"]]
        costs = {x["method"]: (x["quant_s"], x["quant_peak_bytes"]) for x in group}
        same_device = len({x["device"] for x in group}) == 1
        scored = slmq_quant(costs) if len(costs) == len(PAPER_METHODS) and same_device else {}
        for x in rows:
            if x["bits"] == bits:
                x["slmq_quant"] = scored.get(x["method"])
    plotted = {"ppl_ratio": {x["cell"]: (x["ppl_ratio"], x["paper_ppl_ratio"]) for x in rows},
               "cost_vs_accuracy": {x["cell"]: (x["quant_s"], x["ppl_ratio"]) for x in rows
                                    if x["quant_s"] and x["ppl_ratio"] is not None}}
    model = fl["model"] if fl else (next(iter(results.values()))["model"] if results else None)
    return {"model": model, "float": fl and {"ppl": fl["wikitext2"]["ppl"],
                                             "ppl_ci": ppl_interval(fl["wikitext2"].get("window_nll", []),
                                                                    fl["wikitext2"]["seqlen"] - 1)},
            "paper_model": _paper_model(fl or {}), "rows": rows, "plotted": plotted}


def _f(x, fmt: str = "{:.3f}") -> str:
    return "" if x is None else fmt.format(x)


def markdown(rep: dict) -> str:
    fl = rep["float"]
    out = [f"# slmquant report: {rep['model']}", "",
           f"Stand-in for {rep['paper_model'] or '?'}: the paper's values are shown as ratios to the paper "
           "model's own float baseline (its models and calibration split differ from these: compare the "
           "ratios, not the perplexities).", ""]
    if fl:
        ci = fl["ppl_ci"]
        out += [f"Float WikiText-2 perplexity: {fl['ppl']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""), ""]
    tasks = [c for c in ("mmlu", "arc_c", "arc_e", "piqa", "hellaswag") if any(c in x for x in rep["rows"])]
    out += ["## Track 1: accuracy", "",
            "| cell | WikiText-2 ppl [95% CI] | x float [95% CI, paired] | paper x float |" + "".join(f" {t} acc_norm |" for t in tasks),
            "|---|---|---|---|" + "---|" * len(tasks)]
    for x in rep["rows"]:
        ci = x["ppl_ci"]
        cells = [x["cell"], _f(x["ppl"]) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""),
                 _f(x["ppl_ratio"], "{:.4f}") + (f" [{x['ppl_ratio_ci'][0]:.4f}, {x['ppl_ratio_ci'][1]:.4f}]"
                                                  if x["ppl_ratio_ci"] else ""),
                 _f(x["paper_ppl_ratio"], "{:.4f}")]
        cells += [(_f(x[t], "{:.3f}") + f" +- {x[t + '_ci']:.3f}") if t in x else "" for t in tasks]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "## Track 3: quantization cost", "",
            f"slmq_quant over the paper's methods ({', '.join(PAPER_METHODS)}), per bits width, where all "
            "three were quantized on the same device; RTN's near-zero cost would swamp the score.", "",
            "| cell | device | time (s) | peak memory (MiB) | slmq_quant |", "|---|---|---|---|---|"]
    for x in rep["rows"]:
        mib = x["quant_peak_bytes"] / 2**20 if x["quant_peak_bytes"] else None
        out.append(f"| {x['cell']} | {x['device'] or ''} | {_f(x['quant_s'], '{:.1f}')} | {_f(mib, '{:.0f}')} | "
                   f"{_f(x.get('slmq_quant'), '{:.1f}')} |")
    out += ["", "![perplexity ratio](ppl_ratio.png)", "", "![cost against accuracy](cost_vs_accuracy.png)", ""]
    return "\n".join(out)


def _csv(rows: list[dict], cols: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for x in rows:
        w.writerow({c: ("" if x.get(c) is None else x.get(c)) for c in cols})
    return buf.getvalue()


def _plots(rep: dict, folder: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pr = rep["plotted"]["ppl_ratio"]
    names = list(pr)
    pct = lambda r: 100 * (r - 1) if r is not None else 0.0           # noqa: E731
    ci = {x["cell"]: x["ppl_ratio_ci"] for x in rep["rows"]}
    err = [[max(0.0, pct(pr[n][0]) - pct(ci[n][0])) if ci[n] else 0 for n in names],
           [max(0.0, pct(ci[n][1]) - pct(pr[n][0])) if ci[n] else 0 for n in names]]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 2), 4))
    xs = range(len(names))
    ax.bar([i - 0.2 for i in xs], [pct(pr[n][0]) for n in names], 0.4, yerr=err, capsize=3,
           label="slmquant (vs its own float; 95% CI)")
    ax.bar([i + 0.2 for i in xs], [pct(pr[n][1]) for n in names], 0.4, label="paper (vs its float)")
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xticks(list(xs), names, rotation=30, ha="right")
    ax.set_ylabel("WikiText-2 perplexity above float (%)")
    ax.set_title(f"{rep['model']}: perplexity recovery per method and bits")
    ax.legend()
    fig.tight_layout()
    with atomic_path(folder / "ppl_ratio.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    cv = rep["plotted"]["cost_vs_accuracy"]
    if not cv:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for n, (t, r) in cv.items():
        ax.scatter(t, r)
        ax.annotate(n, (t, r), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("quantization wall time (s, log scale)")
    ax.set_ylabel("WikiText-2 perplexity / float")
    ax.set_title(f"{rep['model']}: quantization cost against accuracy")
    fig.tight_layout()
    with atomic_path(folder / "cost_vs_accuracy.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


README_BEGIN = "<!-- slmquant report: begin (generated by `slmquant report DIR --readme README.md`) -->"
README_END = "<!-- slmquant report: end -->"


def readme_section(rep: dict, folder_rel: str) -> str:
    """The report as a README section: its tables under a level-3 heading, image links relative to
    the README (folder_rel: the results folder, relative to the README's folder)."""
    body = markdown(rep).split("\n", 2)[2]                     # without the level-1 title
    body = body.replace("## Track", "### Track").replace("](ppl_ratio.png)", f"]({folder_rel}/ppl_ratio.png)")
    body = body.replace("](cost_vs_accuracy.png)", f"]({folder_rel}/cost_vs_accuracy.png)")
    return f"{README_BEGIN}\nResults of `{folder_rel}` ({rep['model']}):\n\n{body.strip()}\n{README_END}"


def update_readme(readme: Path, rep: dict, folder: Path) -> bool:
    """Replace the README's generated section with this report's; False when it was already equal."""
    import os

    from .errors import SlmquantError
    if not readme.is_file():
        raise SlmquantError(f"{readme}: no such file")
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SlmquantError(f"{readme}: no generated section (the lines {README_BEGIN!r} and {README_END!r})")
    rel = os.path.relpath(folder.resolve(), readme.resolve().parent)
    a, b = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    new = text[:a] + readme_section(rep, rel) + text[b:]
    if new == text:
        return False
    write_text_atomic(readme, new)
    return True


def write_report(folder: Path | str, paper: dict | None = None) -> dict:
    """Read a run folder's results and write report.md, the CSVs and the plots into it."""
    folder = Path(folder)
    rep = build_report(load_results(folder), paper)
    write_text_atomic(folder / "report.md", markdown(rep))
    t1 = ["cell", "method", "bits", "device", "ppl", "ppl_ratio", "paper_ppl_ratio", "mmlu", "arc_c", "arc_e",
          "piqa", "hellaswag"]
    write_text_atomic(folder / "track1.csv", _csv(rep["rows"], t1))
    write_text_atomic(folder / "track3.csv", _csv(rep["rows"], ["cell", "method", "bits", "device", "quant_s",
                                                                "quant_peak_bytes", "slmq_quant"]))
    if rep["rows"]:
        _plots(rep, folder)
    return rep
