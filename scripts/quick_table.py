"""The quick-profile perplexity table (docs/track1_measurements.md): every cell of the suite (the
float model, then each registered method's rows) on both bundled models, WikiText-2 on the first 40 windows of 2048 tokens,
calibration at the quick profile's budget. Cells and measurements come from the on-disk caches, so
a rerun is cheap and an interrupted run resumes.

    .venv/bin/python scripts/quick_table.py [--models smollm2-135m,qwen2.5-0.5b] [--methods rtn,gptq]
        [--only SUBSTRING] [--out results/quick_table.json]

Cells outside the suite (ablations): --cell METHOD:BITS[:KEY=VALUE,...] (repeatable; --methods and
--only then do not apply), e.g. --cell smoothquant:w8a8:alpha_search=true,smooth_vo=false.
--calib paper keeps the methods' paper calibration (GPTQ 128 x 2048, SmoothQuant 512 x 512) while
still scoring the quick subset.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from slmquant import evaluate
from slmquant.cells import Cell, CellCache
from slmquant.measure import MeasureCache, float_key
from slmquant.methods import all_methods, make_config
from slmquant.models import load_model
from slmquant.profiles import profile_settings


def _value(v: str):
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse_cell(spec: str) -> tuple[str, str, dict]:
    """METHOD:BITS[:KEY=VALUE,...] -> (method, bits, settings)."""
    method, bits, *rest = spec.split(":", 2)
    settings = dict(kv.split("=", 1) for kv in rest[0].split(",")) if rest and rest[0] else {}
    return method, bits, {k: _value(v) for k, v in settings.items()}


def plan(models: list[str], methods: list[str] | None, only: str | None, skip: str | None = None,
         extra: list[str] | None = None, calib: str = "quick", with_float: bool = True):
    for model in models:
        if with_float:
            yield model, None
        if extra:
            for spec in extra:
                method, bits, settings = parse_cell(spec)
                yield model, Cell(model, method, make_config(method, bits, {**profile_settings(method, calib),
                                                                           **settings}))
            continue
        for name, m in all_methods().items():
            if methods and name not in methods:
                continue
            for bits, settings in m.suite:
                cell = Cell(model, name, make_config(name, bits, {**profile_settings(name, calib), **settings}))
                if (only is None or only in cell.id) and (skip is None or skip not in cell.id):
                    yield model, cell


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2-135m,qwen2.5-0.5b")
    p.add_argument("--methods", default=None, help="comma-separated; default: every registered method")
    p.add_argument("--only", default=None, help="only cells whose id contains this")
    p.add_argument("--skip", default=None, help="skip cells whose id contains this")
    p.add_argument("--cell", action="append", default=None, metavar="METHOD:BITS[:K=V,...]",
                   help="a cell outside the suite (repeatable)")
    p.add_argument("--calib", choices=["quick", "paper"], default="quick",
                   help="calibration budget: the quick profile's, or the methods' paper settings")
    p.add_argument("--no-float", action="store_true",
                   help="leave out the float row (a Qwen float score costs 10 min on two cores)")
    p.add_argument("--out", default="results/quick_table.json")
    args = p.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(out.read_text()) if out.is_file() else {}
    cells, measures = CellCache(), MeasureCache()
    loaded: dict = {}
    for model_name, cell in plan(args.models.split(","), args.methods and args.methods.split(","),
                                 args.only, args.skip, args.cell, args.calib, not args.no_float):
        if model_name not in loaded:
            loaded.clear()
            loaded[model_name] = load_model(model_name)
        fmodel, tok = loaded[model_name]
        tokens = evaluate.wikitext2_tokens(tok)
        t0 = time.perf_counter()
        if cell is None:
            cid, key = f"{model_name}-float", float_key(fmodel)
            load = lambda: fmodel
        else:
            cid, key = cell.id, cell.key(fmodel.slmquant_source.key)

            def load(cell=cell):
                torch.manual_seed(0)
                return cells.get(cell, fmodel, tok)[0]
        res = measures.wikitext2(key, load, tokens, limit=evaluate.QUICK_WINDOWS)
        first20 = evaluate.PPLResult(**{k: res[k] for k in ("ppl", "nll_sum", "n_tokens", "n_windows", "seqlen",
                                                             "windows", "window_nll")}).ppl_of_first(20)
        row = {"cell": cid, "model": model_name, "ppl_40": res["ppl"], "ppl_20": first20,
               "n_tokens": res["n_tokens"], "eval_s": res["eval_s"], "key": key}
        rec = cells.record(cell, fmodel.slmquant_source.key) if cell is not None else None
        if rec:
            row["quant_s"] = round(rec["cost"]["wall_s"], 2)
            row["quant_peak_mib"] = round(rec["cost"]["peak_mem_bytes"] / 2**20)
        rows[cid] = row
        out.write_text(json.dumps(rows, indent=1))
        print(f"{cid}: ppl40 {res['ppl']:.3f} ppl20 {first20:.3f} ({time.perf_counter() - t0:.0f} s"
              f"{', cached' if res['from_cache'] else ''})", flush=True)
    print("\n| cell | ppl (40 windows) | ppl (first 20) | x float | quantize (s) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for cid, r in rows.items():
        f = rows.get(f"{r['model']}-float")
        ratio = f"{r['ppl_40'] / f['ppl_40']:.3f}" if f else "-"
        print(f"| {cid} | {r['ppl_40']:.3f} | {r['ppl_20']:.3f} | {ratio} | {r.get('quant_s', '-')} "
              f"| {r.get('quant_peak_mib', '-')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
