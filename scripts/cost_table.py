"""The track 3 table (docs/track3_measurements.md): what quantizing each cell cost (wall time from
start to end, calibration included; peak memory and its counter; the calibration budget), read from the records that every
cached cell carries, and slmq_quant per model and bit width over the methods' default cells.
RTN is left out of slmq_quant: it calibrates nothing and takes well under a second, so T_max / T
for it runs into the thousands and says nothing about the methods the score compares (the paper's
column covers SmoothQuant, OmniQuant and SpinQuant).
Nothing is quantized here: build cells first (scripts/quick_table.py, `slmquant quantize`).

    .venv/bin/python scripts/cost_table.py [--models smollm2-135m] [--calib quick|paper]
        [--cell METHOD:BITS[:K=V,...]] [--out results/cost_table.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slmquant.cells import CellCache
from slmquant.models import load_model
from slmquant.scores import slmq_quant

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quick_table import plan  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2-135m")
    p.add_argument("--calib", choices=["quick", "paper"], default="quick")
    p.add_argument("--cell", action="append", default=None, metavar="METHOD:BITS[:K=V,...]")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    store, rows = CellCache(), []
    for model_name in args.models.split(","):
        source = load_model(model_name)[0].slmquant_source.key
        for _, cell in plan([model_name], None, None, None, args.cell, args.calib):
            if cell is None:
                continue
            rec = store.record(cell, source)
            row = {"cell": cell.id, "model": model_name, "method": cell.method, "bits": cell.cfg.scheme,
                   "default": not {k: v for k, v in cell.cfg.settings().items()
                                   if k not in ("calib_samples", "calib_seqlen")}}
            if rec:
                c = rec["cost"]
                row.update(wall_s=c["wall_s"], peak_mib=c["peak_mem_bytes"] / 2**20, counter=c["mem_counter"],
                           device=c["device"], calib=rec["calib_budget"])
            rows.append(row)
    groups: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        if r["default"] and "wall_s" in r and r["method"] != "rtn":
            groups.setdefault((r["model"], r["bits"]), {})[r["method"]] = r
    for group in groups.values():
        for method, score in slmq_quant({m: (r["wall_s"], r["peak_mib"]) for m, r in group.items()}).items():
            group[method]["slmq_quant"] = score
    print("| cell | calibration | wall time (s) | peak memory (MiB) | slmq_quant |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "wall_s" not in r:
            print(f"| {r['cell']} | not built | | | |")
            continue
        cal = f"{r['calib']['samples']} x {r['calib']['seqlen']}" if r["calib"] else "none"
        sq = f"{r['slmq_quant']:.1f}" if "slmq_quant" in r else ""
        print(f"| {r['cell']} | {cal} | {r['wall_s']:.1f} | {r['peak_mib']:.0f} | {sq} |")
    counters = {r["counter"] for r in rows if "counter" in r}
    print(f"\npeak memory counter: {'; '.join(sorted(counters))}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
