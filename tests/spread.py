"""Measure what the default tier's gate statistics do under changes that must not matter, so that
every band in tests/gates.py comes from a measured spread.

One run builds every default-tier cell afresh (never from the cell cache: its key does not hold the
thread count or the instruction set) in the environment it is started in, scores it on the gate's
windows against the float model, and writes one JSON file: per cell the KL divergence from float and
the perplexity ratio, per window, so that any prefix of the windows can be read back. Runs differ by
what they vary:

    python -m tests.spread --out results/spread/base.json                  # 2 threads, this ISA, seed 0
    python -m tests.spread --out results/spread/seed1.json --seed 1        # another calibration draw
    python -m tests.spread --out results/spread/t1.json --threads 1
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python -m tests.spread --out results/spread/avx2.json
    python -m tests.spread --table results/spread/*.json                   # the docs table

The table reads every run's cells and computes, per statistic, its largest relative deviation from
the base run over the other runs, the band tests/gates.py derives from it, and the damage ratio to
RTN with the same settings; `--table ... --literal` prints the SPREAD table that gates.py holds."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from slmquant.files import write_text_atomic


def environment() -> dict:
    return {"threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY"),
            "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA"), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def measure(out: Path, seed: int | None, threads: int | None, select: str | None) -> dict:
    from slmquant.cells import build
    from slmquant.models import load_model
    from tests import gates
    from tests.matrix import DEFAULT, cases, make_cell

    if threads:
        torch.set_num_threads(threads)
    _private_rotation_cache()
    params = [p.values[0] for p in cases(DEFAULT)]
    if select:
        params = [c for c in params if any(s in c.id for s in select.split(","))]
    twins = {gates.rtn_twin(c) for c in params if c.method != "rtn"}          # for the damage ratio
    params += sorted((t for t in twins if t not in params), key=lambda c: c.id)
    model, tok = load_model(DEFAULT.models[0])
    ref = gates.FloatReference(model, tok, DEFAULT)
    doc = json.loads(out.read_text()) if out.exists() else {"env": environment(), "seed": seed, "cells": {}}
    for cell in params:
        if cell.id in doc["cells"]:
            continue                                           # resumed run
        if seed is not None and "seed" in cell.cfg.__dataclass_fields__:
            cell = make_cell(cell.model, cell.method, cell.cfg.scheme, {**cell.cfg.settings(), "seed": seed}, DEFAULT)
        t0 = time.perf_counter()
        torch.manual_seed(0)
        qmodel, _ = build(cell, model, tok)
        m = ref.score(qmodel)
        doc["cells"][cell.id.replace(f"-seed={seed}", "")] = {**m, "build_s": round(time.perf_counter() - t0, 1)}
        print(f"{cell.id}: kl {m['kl']:.5f} ppl_ratio {m['ppl_ratio']:.4f}", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps(doc, indent=1))
    return doc


def _private_rotation_cache() -> None:
    """SpinQuant's learned rotations are part of a build, and their on-disk cache is not keyed by the
    thread count or the instruction set either: each run learns its own, in a directory of its own
    (shared by its W8A8 and W4A8 cells, as in a real build)."""
    import tempfile

    from slmquant.methods import spinquant
    from tests import gates
    folder = Path(tempfile.mkdtemp(prefix="slmquant-spread-rotations-"))
    spinquant._rotation_cache = gates.private_rotation_cache(folder, copy_shared=False)


def _prefix(cell: dict, n: int) -> tuple[float, float]:
    """(KL, perplexity ratio) over the first n windows of a stored cell."""
    kl = sum(cell["window_kl"][:n]) / (n * cell["seqlen"])
    ppl = math.exp(sum(cell["window_nll"][:n]) / (n * (cell["seqlen"] - 1)))
    fppl = math.exp(sum(cell["float_window_nll"][:n]) / (n * (cell["seqlen"] - 1)))
    return kl, ppl / fppl


def spreads(paths: list[Path], windows: int | None = None) -> dict[str, dict]:
    """Per cell of the first run (the base): each statistic's base value and its largest relative
    deviation from it over the other runs ("dev"), and how many runs saw the cell."""
    from tests.gates import rtn_twin_id
    runs = [json.loads(p.read_text()) for p in paths]
    out = {}
    for cid in runs[0]["cells"]:
        vals: dict[str, list[float]] = {"kl": [], "ppl_ratio": [], "damage_ratio": []}
        for doc in runs:
            c = doc["cells"].get(cid)
            if c is None:
                continue
            n = windows or c["n_windows"]
            kl, pr = _prefix(c, n)
            vals["kl"].append(kl)
            vals["ppl_ratio"].append(pr)
            twin = doc["cells"].get(rtn_twin_id(cid))
            if twin is not None and twin is not c:
                vals["damage_ratio"].append(kl / _prefix(twin, n)[0])
        out[cid] = {"runs": len(vals["kl"])}
        for k, xs in vals.items():
            if xs:
                out[cid][k] = {"base": xs[0], "dev": max(abs(x / xs[0] - 1) for x in xs)}
    return out


def table(paths: list[Path], windows: int | None = None) -> str:
    """Markdown: per cell, each gated statistic's base value, its measured deviation over the runs,
    the band tests/gates.py sets from it, and whether the vs-RTN gate can tell the method from RTN."""
    from tests.gates import BAND_FACTOR, BAND_FLOOR
    band = lambda k, dev: max(BAND_FACTOR * dev, BAND_FLOOR[k])
    rows = ["| cell | KL | dev | band | ppl ratio | dev | band | KL / RTN's | dev | band | vs RTN |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for cid, s in spreads(paths, windows).items():
        kl, pr, dr = s["kl"], s["ppl_ratio"], s.get("damage_ratio")
        row = (f"| {cid} | {kl['base']:.4f} | {kl['dev']:.1%} | {band('kl', kl['dev']):.1%} | {pr['base']:.4f} | "
               f"{pr['dev']:.2%} | {band('ppl_ratio', pr['dev']):.2%} |")
        if dr:
            b = band("damage_ratio", dr["dev"])
            tell = "yes" if abs(dr["base"] - 1) > b else "**no**: inside the noise"
            row += f" {dr['base']:.3f} | {dr['dev']:.1%} | {b:.1%} | {tell} |"
        else:
            row += " (RTN) | | | |"
        rows.append(row)
    return "\n".join(rows)


def spread_literal(paths: list[Path]) -> str:
    """The SPREAD table of tests/gates.py for these runs."""
    lines = ["SPREAD: dict[str, dict[str, float]] = {"]
    for cid, s in spreads(paths).items():
        devs = ", ".join(f'"{k}": {s[k]["dev"]:.4f}' for k in ("kl", "damage_ratio", "ppl_ratio") if k in s)
        lines.append(f'    "{cid}": {{{devs}}},')
    return "\n".join(lines + ["}"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--seed", type=int, default=None, help="calibration draw of every calibrating method")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("-k", dest="select", default=None, help="only cells whose id contains one of these (comma-separated)")
    ap.add_argument("--table", nargs="+", type=Path, help="print the spread table of these runs (first: base)")
    ap.add_argument("--windows", type=int, default=None, help="table over the first N windows only")
    ap.add_argument("--literal", action="store_true", help="with --table: print tests/gates.py's SPREAD instead")
    a = ap.parse_args(argv)
    if a.table:
        print(spread_literal(a.table) if a.literal else table(a.table, a.windows))
        return 0
    if not a.out:
        ap.error("--out or --table is required")
    measure(a.out, a.seed, a.threads, a.select)
    return 0


if __name__ == "__main__":
    sys.exit(main())
