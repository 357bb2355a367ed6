"""`slmquant report DIR`: the tables and plots of every result under DIR (written by `slmquant bench`
or `slmquant run`: `<device class>/<model>/<cell>.json`), in the layout of the SLMQuant paper's Tables
1-4 and Figures 3-4, with the published values beside ours as ratios to each model's own float baseline.

Written into DIR: `report.md` (per model and device class: track 1 with slmq_perf, track 2 with
slmq_infer, track 3 with slmq_quant), `track1.csv`, `track2.csv`, `track3.csv`, and per model and
device class the PNGs `<model>-<device class>-{ppl_ratio,scores,outliers,cost_vs_accuracy}.png`:
perplexity recovery per method x bits beside the paper's, the three scores per cell (Figure 4), the
float model's per-layer weight and activation outliers (Figure 3), quantization time against
perplexity. `build_report` returns every number it tabulates or plots, so that a test can check
them against the results it was given. A missing cell or score is a blank, never an error; results
of different device classes are reported apart, never compared.

Confidence intervals: perplexity over W scored windows, exp(mean NLL +- t s / sqrt(W)) from the
spread s of the per-window mean NLL (t: Student's 95% quantile, W - 1 degrees of freedom); a task
accuracy, +- 1.96 of lm-eval's standard error. A cell is compared with the float result only when
both scored the same model on the same windows under the same profile."""
from __future__ import annotations

import csv
import io
import json
import math
import re
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
    """name -> result for every cell JSON of one folder written by `slmquant bench` (this result
    schema); unreadable files (an interrupted write) and results of another schema are skipped."""
    from .bench import SCHEMA
    out = {}
    for p in sorted(Path(folder).glob("*.json")):
        try:
            res = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(res, dict) or res.get("schema") != SCHEMA or not res.get("model") or not res.get("bits"):
            continue
        w = res.get("wikitext2")
        if w is not None and not (isinstance(w, dict) and {"ppl", "seqlen"} <= set(w)):
            continue
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
PERF_TASKS = ("mmlu", "arc_c", "arc_e", "piqa", "hellaswag")        # slmq_perf's datasets beside "wiki"


def _order(row: dict) -> tuple:
    b, m = row["bits"] or "", row["method"] or ""
    return (BITS_ORDER.index(b) if b in BITS_ORDER else len(BITS_ORDER), b,
            METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m)


def _paper_model(result: dict) -> str | None:
    ref = (result.get("source") or {}).get("stand_in_for") or ""
    return ref.split("/")[-1] or None


def _paired_tasks(r: dict, ref: dict | None) -> dict[str, str]:
    """The paper's column -> the task both results scored for it (mmlu_cloze before mmlu), so
    that a cell is never compared with float on another form of the same benchmark."""
    out = {}
    for task, col in TASK_COLUMNS.items():
        if col not in out and task in r and ref is not None and task in ref:
            out[col] = task
    return out


def build_report(results: dict[str, dict], paper: dict | None) -> dict:
    """Rows of Tables 1-2 (WikiText-2, tasks, slmq_perf), 3 (inference cost, slmq_infer) and 4
    (quantization cost, slmq_quant) per cell of one model on one device class, and the plotted
    values. paper: scores.paper_tables() or None."""
    from .scores import slmq_perf, slmq_quant
    fl = results.get("float")
    rows = []

    def comparable(r: dict) -> bool:                 # the same model, windows and profile as float
        a, b = r.get("wikitext2"), fl.get("wikitext2")
        return (a is not None and b is not None and r["model"] == fl["model"] and r.get("profile") == fl.get("profile")
                and (a.get("windows"), a["seqlen"], a.get("n_windows")) == (b.get("windows"), b["seqlen"], b.get("n_windows")))
    for name, r in results.items():
        if name == "float":
            continue
        w = r.get("wikitext2")
        ref = fl if fl and comparable(r) else None
        default_cell = name == f"{r.get('method')}-{r.get('bits')}"      # not an ablation: the paper's row applies
        row = {"cell": name, "method": r.get("method"), "bits": r.get("bits"), "device": r.get("device"),
               "ppl": w["ppl"] if w else None, "ppl_ci": ppl_interval(w.get("window_nll", []), w["seqlen"] - 1) if w else None,
               "ppl_ratio": w["ppl"] / ref["wikitext2"]["ppl"] if ref else None, "paper_ppl_ratio": None,
               "ppl_ratio_ci": ratio_interval(w.get("window_nll", []), ref["wikitext2"].get("window_nll", []),
                                              w["seqlen"] - 1) if ref else None,
               "slmq_perf": None, "paper_slmq_perf": None, "slmq_infer": None, "slmq_infer_macs": None,
               "paper_slmq_infer": None, "paper_slmq_quant": None}
        pm = _paper_model(r) if default_cell else None
        ptab = ((paper or {}).get("track1") or {}).get(pm or "", {})
        pcell = ptab.get(f"{row['method']}/{row['bits']}")
        if pcell and "FP16" in ptab:
            row["paper_ppl_ratio"] = pcell["wiki"] / ptab["FP16"]["wiki"]
            row["paper_slmq_perf"] = pcell.get("slmq_perf")
        for key, col in (("track2", "paper_slmq_infer"), ("track3", "paper_slmq_quant")):
            p = (((paper or {}).get(key) or {}).get(pm or "", {})).get(f"{row['method']}/{row['bits']}") or {}
            row[col] = p.get(col.removeprefix("paper_"))
        pairs = _paired_tasks(r, ref)
        for col, task in pairs.items():
            se = r[task].get("acc_norm_stderr")
            row[col] = r[task]["acc_norm"]
            row[col + "_ci"] = Z95 * se if isinstance(se, (int, float)) else 0.0
            row[col + "_ratio"] = (r[task]["acc_norm"] / ref[task]["acc_norm"]) if ref[task]["acc_norm"] else None
            row["n_items"] = r[task].get("n_items")
        acc = {c: r[t]["acc_norm"] for c, t in pairs.items()}
        facc = {c: ref[t]["acc_norm"] for c, t in pairs.items()}
        if ref and all(acc.get(c, 0) > 0 and facc.get(c, 0) > 0 for c in PERF_TASKS):   # else undefined: blank
            row["slmq_perf"] = slmq_perf({**acc, "wiki": w["ppl"]}, {**facc, "wiki": ref["wikitext2"]["ppl"]})
        inf = r.get("infer")
        if inf:
            row.update(prefill_speedup=inf["ratios"]["prefill_speedup"], decode_speedup=inf["ratios"]["decode_speedup"],
                       memory_ratio=inf["ratios"]["memory"], storage_ratio=inf["ratios"]["storage_vs_float16"],
                       macs_ratio=inf["real"]["macs"]["total"] / inf["float"]["macs"]["total"],
                       storage_mib=inf["real"]["storage"]["bytes"] / 2**20,
                       slmq_infer=inf["slmq_infer"], slmq_infer_macs=inf["slmq_infer_macs"])
        q = (r.get("quantization") or {}).get("cost") or {}
        row["quant_s"], row["quant_peak_bytes"] = q.get("wall_s"), q.get("peak_mem_bytes")
        m = r.get("machine") or {}
        row["quant_where"] = (q.get("device") or r.get("device"), m.get("threads"), m.get("cpu_capability"),
                              m.get("machine"), m.get("cuda_device"))
        row["default_cell"] = default_cell
        rows.append(row)
    rows.sort(key=_order)
    # slmq_quant per bits width over the paper's three methods, where all three are present
    # (default cells only: an ablation is not the method's row), built on one machine (the device,
    # thread count, instruction set and GPU all alike: costs from two machines do not compare)
    for bits in sorted({x["bits"] for x in rows}):
        group = [x for x in rows if x["bits"] == bits and x["method"] in PAPER_METHODS and x["default_cell"]
                 and x["quant_s"] and x["quant_peak_bytes"]]
        costs = {x["method"]: (x["quant_s"], x["quant_peak_bytes"]) for x in group}
        same_device = len({x["quant_where"] for x in group}) == 1
        scored = slmq_quant(costs) if len(costs) == len(PAPER_METHODS) and same_device else {}
        for x in rows:
            if x["bits"] == bits:
                x["slmq_quant"] = scored.get(x["method"]) if x["default_cell"] else None
    plotted = {"ppl_ratio": {x["cell"]: (x["ppl_ratio"], x["paper_ppl_ratio"]) for x in rows},
               "cost_vs_accuracy": {x["cell"]: (x["quant_s"], x["ppl_ratio"]) for x in rows
                                    if x["quant_s"] and x["ppl_ratio"] is not None},
               "scores": {x["cell"]: (x["slmq_perf"], x["slmq_infer"], x["slmq_quant"]) for x in rows
                          if any(v is not None for v in (x["slmq_perf"], x["slmq_infer"], x["slmq_quant"]))},
               "outliers": _outlier_series(fl) if fl else {}}
    model = fl["model"] if fl else (next(iter(results.values()))["model"] if results else None)
    any_r = fl or (next(iter(results.values())) if results else {})
    float_acc = {c: fl[t]["acc_norm"] for c, t in _paired_tasks(fl, fl).items()} if fl else {}
    return {"model": model, "device_class": _device_class(any_r), "profile": any_r.get("profile"),
            "machine": any_r.get("machine"), "machines": _machines(results),
            "float": fl and fl.get("wikitext2") and {
                "ppl": fl["wikitext2"]["ppl"], "n_tokens": fl["wikitext2"].get("n_tokens"),
                "ppl_ci": ppl_interval(fl["wikitext2"].get("window_nll", []), fl["wikitext2"]["seqlen"] - 1), **float_acc},
            "paper_model": _paper_model(any_r), "rows": rows, "plotted": plotted}


def _machine_line(m: dict) -> str:
    v = m.get("versions") or {}
    return (f"{m.get('threads')} torch thread(s), CPU capability {m.get('cpu_capability')}"
            + (f", {m['cuda_device']}" if m.get("cuda_device") else "")
            + f", torch {v.get('torch')}, transformers {v.get('transformers')}")


def _machines(results: dict[str, dict]) -> dict[str, list[str]]:
    """Each machine that measured these results -> what it measured: "cell track N" where a result
    keeps the machine of every track (`track_machines`), else "cell (its last run)": a result
    written before per-track records keeps only the machine of its latest run."""
    out: dict[str, list[str]] = {}
    for name, r in results.items():
        per = r.get("track_machines") or {}
        for t in r.get("tracks_done") or []:
            if str(t) in per:
                out.setdefault(_machine_line(per[str(t)]), []).append(f"{name} track {t}")
        if r.get("machine") and any(str(t) not in per for t in r.get("tracks_done") or []):
            out.setdefault(_machine_line(r["machine"]), []).append(f"{name} (its last run)")
    return out


def _outlier_series(fl: dict) -> dict:
    """Per activation point and per weight kind, the per-layer statistic (lists over layers)."""
    layers = (fl.get("outliers") or {}).get("layers") or []
    if not layers:
        return {}
    return {"act_ratio": {p: [x["act_ratio"][p] for x in layers] for p in layers[0]["act_ratio"]},
            "act_max": {p: [x["act_max"][p] for x in layers] for p in layers[0]["act_max"]},
            "weight": {n: [x["weight"][n] for x in layers] for n in layers[0]["weight"]}}


def _device_class(r: dict) -> str:
    return r.get("device_class") or ("cpu" if str(r.get("device", "cpu")).startswith("cpu") else str(r.get("device")))


def load_groups(folder: Path) -> dict[tuple[str, str], dict[str, dict]]:
    """(device class, model) -> {cell name: result} for every result under `folder` (any depth: the
    parts of a matrix run on several machines merge by copying their folders into one)."""
    groups: dict[tuple[str, str], dict[str, dict]] = {}
    for sub in sorted({p.parent for p in Path(folder).rglob("*.json")}):
        for name, r in load_results(sub).items():
            groups.setdefault((_device_class(r), r["model"]), {})[name] = r
    return groups


def _f(x, fmt: str = "{:.3f}") -> str:
    return "" if x is None else fmt.format(x)


def _ci(ci, fmt: str = "{:.3f}") -> str:
    return f" [{fmt.format(ci[0])}, {fmt.format(ci[1])}]" if ci else ""


def plot_names(rep: dict) -> dict[str, str]:
    """The PNG files of one group's report (one set per model and device class)."""
    from .bench import model_slug
    stem = f"{model_slug(rep['model'])}-{rep['device_class']}"
    return {k: f"{stem}-{k}.png" for k in ("ppl_ratio", "scores", "outliers", "cost_vs_accuracy")}


def markdown_group(rep: dict, level: int = 2, link: str = "") -> str:
    """One model on one device class: Tables 1-4 in the paper's layout and the figures' links
    (link: the folder the PNGs are in, relative to where the Markdown lives)."""
    h = "#" * level
    fl = rep["float"]
    items = next((x["n_items"] for x in rep["rows"] if x.get("n_items")), None)
    out = [f"{h} {rep['model']} on {rep['device_class']}, profile {rep['profile']}", "",
           f"Stand-in for {rep['paper_model'] or '?'}: the paper's values are shown as ratios to the paper "
           "model's own float baseline (its models and calibration split differ from these: compare the "
           "ratios, not the perplexities).", ""]
    machines = rep.get("machines") or {}
    if len(machines) > 1:                            # a folder resumed or extended on another machine
        out += ["Measured on more than one machine (an earlier track of a cell marked \"its last run\" "
                "may have been measured elsewhere):", ""]
        out += [f"- {line}: {', '.join(items)}." for line, items in machines.items()] + [""]
    elif machines or rep.get("machine"):
        line = next(iter(machines)) if machines else _machine_line(rep["machine"])
        out += [f"Measured with {line}.", ""]
    if fl:
        accs = ", ".join(f"{t} {fl[t]:.3f}" for t in PERF_TASKS if t in fl)
        out += [f"Float: WikiText-2 perplexity {fl['ppl']:.3f}{_ci(fl['ppl_ci'])} over {fl['n_tokens']} tokens"
                + (f"; acc_norm {accs} ({items} items per task)" if accs else "") + ".", ""]
    tasks = [c for c in PERF_TASKS if any(c in x for x in rep["rows"])]
    out += [f"{h}# Track 1: accuracy (the paper's Tables 1-2)", "",
            "WikiText-2 perplexity with its 95% interval over windows, the ratio to float with its paired "
            "95% interval, task acc_norm +- its 95% half-width, slmq_perf (the paper's beside it).", "",
            "| cell | WikiText-2 ppl [95% CI] | x float [95% CI] | paper x float |"
            + "".join(f" {t} |" for t in tasks) + " slmq_perf | paper |",
            "|---|---|---|---|" + "---|" * len(tasks) + "---|---|"]
    for x in rep["rows"]:
        cells = [x["cell"], _f(x["ppl"]) + _ci(x["ppl_ci"]), _f(x["ppl_ratio"], "{:.4f}") + _ci(x["ppl_ratio_ci"], "{:.4f}"),
                 _f(x["paper_ppl_ratio"], "{:.4f}")]
        cells += [(_f(x[t], "{:.3f}") + f" +- {x[t + '_ci']:.3f}") if t in x else "" for t in tasks]
        cells += [_f(x["slmq_perf"], "{:.1f}"), _f(x["paper_slmq_perf"], "{:.1f}")]
        out.append("| " + " | ".join(cells) + " |")
    if any(x["slmq_infer"] is not None for x in rep["rows"]):
        out += ["", f"{h}# Track 2: inference cost (the paper's Table 3)", "",
                "The cell as a real low-bit model against the float model in the same process; ratios are "
                "quantized / float. slmq_infer with tokens/s (ours) and with MACs (the paper's variant). An "
                "integer multiply-accumulate counts as one MAC, so the MACs ratio stays near 1; the paper's "
                "Table 3 prints far fewer MACs for W8A8 (17.21 G against 3.64 G on SmolLM2-135M), a count "
                "this one does not reproduce, so the MACs variants differ.", "",
                "| cell | prefill x | decode x | peak memory x | storage MiB (x float16) | MACs x | slmq_infer | "
                "slmq_infer (MACs) | paper |", "|---|---|---|---|---|---|---|---|---|"]
        for x in rep["rows"]:
            if x["slmq_infer"] is None:
                continue
            out.append(f"| {x['cell']} | {x['prefill_speedup']:.2f} | {x['decode_speedup']:.2f} | "
                       f"{x['memory_ratio']:.3f} | {x['storage_mib']:.1f} ({x['storage_ratio']:.3f}) | "
                       f"{x['macs_ratio']:.3f} | {x['slmq_infer']:.1f} | {x['slmq_infer_macs']:.1f} | "
                       f"{_f(x['paper_slmq_infer'], '{:.1f}')} |")
    out += ["", f"{h}# Track 3: quantization cost (the paper's Table 4)", "",
            f"slmq_quant over the paper's methods ({', '.join(PAPER_METHODS)}), per bits width, where all "
            "three were built on one machine (device, threads, instruction set); RTN's near-zero cost would "
            "swamp the score. A cell read from the cache keeps the cost of its build; a build that reuses "
            "SpinQuant rotations learned for another cell is charged their learning (the cost's `shared_s`; "
            "records without that field predate the rule and are not).", "",
            "| cell | built on | time (s) | peak memory (MiB) | slmq_quant | paper |", "|---|---|---|---|---|---|"]
    for x in rep["rows"]:
        mib = x["quant_peak_bytes"] / 2**20 if x["quant_peak_bytes"] else None
        out.append(f"| {x['cell']} | {x['quant_where'][0] or ''} | {_f(x['quant_s'], '{:.1f}')} | {_f(mib, '{:.0f}')} | "
                   f"{_f(x.get('slmq_quant'), '{:.1f}')} | {_f(x['paper_slmq_quant'], '{:.1f}')} |")
    names = plot_names(rep)
    figs = [("ppl_ratio", "perplexity above float"), ("scores", "the three scores (the paper's Figure 4)"),
            ("outliers", "per-layer outliers (the paper's Figure 3)"), ("cost_vs_accuracy", "cost against accuracy")]
    out += [""] + [f"![{alt}]({link}{names[k]})" for k, alt in figs if rep["drawn"].get(k)] + [""]
    return "\n".join(out)


def markdown(reps: list[dict], link: str = "") -> str:
    return "\n".join(["# slmquant report", ""] + [markdown_group(r, 2, link) for r in reps])


def _csv(rows: list[dict], cols: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for x in rows:
        w.writerow({c: ("" if x.get(c) is None else x.get(c)) for c in cols})
    return buf.getvalue()


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _bars_done(fig, ax, cells: list[str], ref: float, ylabel: str, title: str, path: Path) -> None:
    """The common finish of a bar chart over cells: a reference line, each bar's value written on
    it, labels, the legend outside the bars, saved."""
    ax.axhline(ref, color="black", lw=0.8, ls="--" if ref else "-")
    for bars in ax.containers:
        if hasattr(bars, "datavalues"):                      # a missing value (NaN) is no bar and no label
            ax.bar_label(bars, labels=["" if v != v else f"{v:.3g}" for v in bars.datavalues], fontsize=6, padding=1)
    ax.set_xticks(list(range(len(cells))), cells, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    _save(fig, path)


def _symlog_ticks(ax, top: float) -> None:
    """Readable ticks on a symlog percent axis (0, 1, 2, 5, 10, 20, 50, ... up to the top)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter
    ticks = [t for t in (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)
             if t <= max(top, 1) * 1.5]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(FixedLocator([]))


def _plots(rep: dict, folder: Path) -> None:
    """Draw one group's figures (those with something to show: `rep["drawn"]`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names, title = plot_names(rep), f"{rep['model']} ({rep['device_class']})"
    pr = rep["plotted"]["ppl_ratio"]
    if pr:
        cells = list(pr)
        pct = lambda r: 100 * (r - 1) if r is not None else math.nan      # noqa: E731
        ci = {x["cell"]: x["ppl_ratio_ci"] for x in rep["rows"]}
        err = [[max(0.0, pct(pr[n][0]) - pct(ci[n][0])) if ci[n] and pr[n][0] is not None else 0 for n in cells],
               [max(0.0, pct(ci[n][1]) - pct(pr[n][0])) if ci[n] and pr[n][0] is not None else 0 for n in cells]]
        fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(cells) + 4), 4.5))
        xs = range(len(cells))
        ours, theirs = [pct(pr[n][0]) for n in cells], [pct(pr[n][1]) for n in cells]
        ax.bar([i - 0.2 for i in xs], ours, 0.4, yerr=err, capsize=3, label="slmquant, vs its own\nfloat (95% CI)")
        ax.bar([i + 0.2 for i in xs], theirs, 0.4, label="paper, vs its float\n(none: not published)")
        ax.set_yscale("symlog", linthresh=10)
        _symlog_ticks(ax, max([v for v in ours + theirs if v == v] + [1.0]))
        _bars_done(fig, ax, cells, 0.0, "WikiText-2 perplexity above float (%, symlog)",
                   f"{title}: perplexity above float per method and bits", folder / names["ppl_ratio"])
    sc = rep["plotted"]["scores"]
    if sc:
        cells = list(sc)
        fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(cells) + 4), 4.5))
        for j, label in enumerate(("slmq_perf", "slmq_infer", "slmq_quant")):
            ax.bar([i + (j - 1) * 0.27 for i in range(len(cells))],
                   [math.nan if sc[n][j] is None else sc[n][j] for n in cells], 0.27,
                   label=label)
        ax.set_xlabel("a missing bar: not measured (slmq_quant: only where the paper's three methods were)",
                      fontsize=8)
        _bars_done(fig, ax, cells, 100.0, "score (100: as float / the costliest)",
                   f"{title}: the three scores per cell (the paper's Figure 4)", folder / names["scores"])
    ol = rep["plotted"]["outliers"]
    if ol:
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        for ax, key, ylabel in ((axes[0], "act_ratio", "activation: max / median channel peak"),
                                (axes[1], "act_max", "activation: largest |x|"),
                                (axes[2], "weight", "weight: max |w| / RMS(w)")):
            for name, ys in ol[key].items():
                ax.plot(range(len(ys)), ys, marker=".", label=name)
            ax.set_yscale("log")
            ax.set_xlabel("decoder layer")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=7)
        fig.suptitle(f"{title}: per-layer outliers of the float model (calibration text)")
        _save(fig, folder / names["outliers"])
    cv = rep["plotted"]["cost_vs_accuracy"]
    if cv:
        from matplotlib.ticker import FuncFormatter, NullFormatter
        # a cell's width and its label: the method, or the cell's name for an ablation (settings)
        meta = {x["cell"]: (x["bits"], x["method"] if x["default_cell"] else x["cell"]) for x in rep["rows"]}
        widths = sorted({meta[n][0] for n in cv}, key=lambda b: [int(d) for d in re.findall(r"\d+", b)])
        methods = sorted({meta[n][1] for n in cv})
        colour = {m: f"C{i % 10}" for i, m in enumerate(methods)}
        fig, axes = plt.subplots(1, len(widths), figsize=(4.2 * len(widths) + 1.8, 4), squeeze=False)
        for ax, bits in zip(axes[0], widths):                # one panel per width: its own y range
            for n, (t, r) in cv.items():
                b, label = meta[n]
                if b == bits:
                    ax.scatter(max(t, 0.1), r, color=colour[label], s=36, label=label)
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("quantization wall time (s, log scale)")
            ax.set_title(bits.upper(), fontsize=10)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("WikiText-2 perplexity / float")
        handles = {h.get_label(): h for ax in axes[0] for h in ax.collections}
        axes[0][-1].legend([handles[m] for m in methods if m in handles], [m for m in methods if m in handles],
                           loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
        fig.suptitle(f"{title}: quantization cost against accuracy (lower left is better)", fontsize=10)
        _save(fig, folder / names["cost_vs_accuracy"])



README_BEGIN = "<!-- slmquant report: begin (generated by `slmquant report DIR --readme README.md`) -->"
README_END = "<!-- slmquant report: end -->"


def readme_section(reps: list[dict], folder_rel: str) -> str:
    """The report as a README section: each group under a level-3 heading, image links relative to
    the README (folder_rel: the results folder, relative to the README's folder)."""
    body = "\n".join(markdown_group(r, 3, f"{folder_rel}/") for r in reps)
    return f"{README_BEGIN}\nResults of `{folder_rel}`:\n\n{body.strip()}\n{README_END}"


def update_readme(readme: Path, reps: list[dict], folder: Path) -> bool:
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
    new = text[:a] + readme_section(reps, rel) + text[b:]
    if new == text:
        return False
    write_text_atomic(readme, new)
    return True


def build_all(folder: Path | str, paper: dict | None = None) -> list[dict]:
    """One report per (model, device class) found under `folder`, the plotted values included
    (`drawn` tells which figures have something to show)."""
    reps = []
    for (_, _), results in sorted(load_groups(Path(folder)).items()):
        rep = build_report(results, paper)
        p = rep["plotted"]
        rep["drawn"] = {k: bool(v) for k, v in p.items()}              # one figure per plotted series
        reps.append(rep)
    return reps


def write_report(folder: Path | str, paper: dict | None = None) -> list[dict]:
    """Read every result under `folder` and write report.md, the CSVs and the plots into it."""
    folder = Path(folder)
    reps = build_all(folder, paper)
    for rep in reps:
        _plots(rep, folder)
    write_text_atomic(folder / "report.md", markdown(reps))
    rows = [{"model": r["model"], "device_class": r["device_class"], **x} for r in reps for x in r["rows"]]
    head = ["model", "device_class", "cell", "method", "bits"]
    write_text_atomic(folder / "track1.csv", _csv(rows, head + ["ppl", "ppl_ratio", "paper_ppl_ratio", *PERF_TASKS,
                                                                "slmq_perf", "paper_slmq_perf"]))
    write_text_atomic(folder / "track2.csv", _csv(rows, head + ["prefill_speedup", "decode_speedup", "memory_ratio",
                                                                "storage_mib", "storage_ratio", "macs_ratio",
                                                                "slmq_infer", "slmq_infer_macs", "paper_slmq_infer"]))
    write_text_atomic(folder / "track3.csv", _csv(rows, head + ["device", "quant_s", "quant_peak_bytes",
                                                                "slmq_quant", "paper_slmq_quant"]))
    return reps
