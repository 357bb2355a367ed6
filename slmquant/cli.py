"""The slmquant command line (PROTOCOL.md section 9). argparse lives only here.

Every command takes --json and then prints one JSON object as its last line of stdout; errors exit
non-zero with a one-line message on stderr (a traceback only with --debug)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from .errors import SlmquantError




def _limit(value: str | None):
    if value is None or value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise SlmquantError(f"--limit takes a number or 'all', got {value!r}") from None


def _task_items(value: str) -> int | None:
    """--task-items: a positive number of items per task, or 'all' (None)."""
    if value == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise SlmquantError(f"--task-items takes a positive number or 'all', got {value!r}")
    return n


def columns(rows: list[tuple[str, ...]], indent: str = "  ", sep: str = " ") -> str:
    """Rows of text as left-aligned columns, each as wide as its longest entry."""
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(indent + sep.join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _print_table(rows: list[dict], cols: list[str]) -> None:
    print(columns([tuple(cols), *(tuple(_fmt(r.get(c)) for c in cols) for r in rows)], indent="", sep="  "))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return "-" if v is None else str(v)


# ---------------------------------------------------------------- commands
def cmd_models(args) -> dict:
    from .models import ALIASES, cache_dir
    rows = []
    for alias, a in ALIASES.items():
        cached = any((cache_dir() / "models").glob(f"{Path(a.bundled.filename).stem}-*/slmquant_manifest.json"))
        rows.append({"alias": alias, "arch": a.arch, "offline": a.bundled.describes,
                     "packages": ",".join(sorted({p for p, _ in a.bundled.parts})),
                     "hub_id": a.hub_id, "cached": cached})
    if not args.json:
        _print_table(rows, ["alias", "arch", "offline", "hub_id", "cached"])
    return {"models": rows, "cache": str(cache_dir())}


def cmd_data(args) -> dict:
    from . import data
    root = data.data_dir(args.data_dir)
    files = {rel: data.file_status(rel, root) for rel in data.CHECKSUMS}
    bad = {k: v for k, v in files.items() if v != "ok"}
    if not args.json:
        print(f"data directory: {root}")
        groups: dict[str, list[str]] = {}
        for rel, st in files.items():
            groups.setdefault(rel.split("/")[0], []).append(st)
        for g, sts in groups.items():
            print(f"  {g:15s} {sts.count('ok')}/{len(sts)} files ok")
        for rel, st in bad.items():
            print(f"  {st.upper()}: {rel} (expected sha256 {data.CHECKSUMS[rel]['sha256']})")
    if bad:
        raise SlmquantError(f"{len(bad)} data file(s) missing or corrupt in {root}, first: {next(iter(bad))}")
    return {"data_dir": str(root), "files": len(files), "ok": len(files) - len(bad)}


def _eval_wikitext2(model, tok, model_key: str, limit, profile, data_dir, fresh: bool = False) -> dict:
    from . import data, evaluate
    from .measure import MeasureCache
    root = data.data_dir(data_dir)
    tokens = evaluate.wikitext2_tokens(tok, "test", root)
    if limit is None:          # the profile decides: quick = the first 40 windows, smoke 4, paper = all
        from .profiles import profile_windows
        limit, seed = profile_windows(profile), None
    else:                      # --limit N: a seeded sample of N windows; --limit all: every window
        seed = None if limit == "all" else 0
    return MeasureCache().wikitext2(model_key, lambda: model, tokens, limit=limit, sample_seed=seed,
                                    refresh=fresh)


def _settings(pairs: list[str] | None, group_size: int | None) -> dict:
    out = {}
    for kv in pairs or []:
        if "=" not in kv:
            raise SlmquantError(f"--set takes key=value, got {kv!r}")
        k, v = kv.split("=", 1)
        out[k.strip()] = v
    if group_size is not None:
        out["group_size"] = str(group_size)
    return out


def _quantized(args, model, tok, method: str, bits: str):
    """The quantized cell (from the cell cache when it is there) and its record."""
    from .cells import Cell, CellCache
    from .methods import make_config
    from .profiles import profile_settings
    over = {**profile_settings(method, args.profile, bits), **_settings(args.set, args.group_size)}
    cfg = make_config(method, bits, over)
    cell = Cell(args.model, method, cfg)
    qmodel, record, built = CellCache().get(cell, model, tok)
    record = {**record, "from_cache": not built, "key": cell.key(model.slmquant_source.key)}
    return qmodel, record


def cmd_eval(args) -> dict:
    import torch
    from .bench import resolve_device, versions
    from .measure import float_key
    from .models import load_model
    from .tasks import TASKS
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t != "wikitext2" and t not in TASKS]
    if unknown:
        raise SlmquantError(f"unknown task(s) {', '.join(unknown)}: available: wikitext2, {', '.join(TASKS)}")
    if (args.method is None) != (args.bits is None) and args.method != "none":
        raise SlmquantError("give both METHOD and BITS (e.g. rtn w4a8), or neither for the float model")
    if getattr(args, "real", None) and args.method in (None, "none"):
        raise SlmquantError("--real needs a quantized cell (METHOD BITS): the float model has no integer form")
    limit = _limit(args.limit)
    if args.data_dir:
        os.environ["SLMQUANT_DATA"] = args.data_dir
    torch.manual_seed(0)
    model, tok = load_model(args.model, device=resolve_device(args.device))
    model_key = float_key(model)
    result = {"model": args.model, "source": model.slmquant_source.to_dict(), "method": "none",
              "bits": "w16a16", "profile": args.profile, "load_s": round(model.slmquant_load_s, 3),
              "device": str(next(model.parameters()).device), "versions": versions()}
    if args.method not in (None, "none"):
        model, record = _quantized(args, model, tok, args.method, args.bits)
        model_key = record["key"]
        result.update(method=args.method, bits=record["bits"], cell=record["cell"],
                      settings=record["settings"], quantization=record)
        if getattr(args, "real", None):
            from . import real
            model = real.to_real(model, embeddings=args.real)
            model_key = real.measure_key(model_key, model)
            result.update(real={"embeddings": args.real, "kernels": real.kernel_paths(model)},
                          cell=record["cell"] + f" (real, {args.real} embeddings)")
    t0 = time.perf_counter()
    name = result.get("cell", args.model + " float")
    if "wikitext2" in tasks:
        result["wikitext2"] = _eval_wikitext2(model, tok, model_key, limit, args.profile, args.data_dir,
                                              getattr(args, "fresh", False))
        if not args.json:
            w = result["wikitext2"]
            print(f"{name}: wikitext2 ppl {w['ppl']:.3f} over {w['n_tokens']} "
                  f"tokens ({w['windows']} windows of {w['seqlen']}); eval {w['eval_s']:.0f} s"
                  f"{' [measurement from cache]' if w['from_cache'] else ''}")
    mc = [t for t in tasks if t != "wikitext2"]
    if mc:
        from .measure import MeasureCache
        from .profiles import PR_GATE_ITEMS
        from .tasks import PER_ITEM, TaskSettings
        items = limit if isinstance(limit, int) else (None if limit == "all" or args.profile == "paper"
                                                       else PR_GATE_ITEMS)
        res = MeasureCache().tasks(model_key, lambda: (model, tok), mc, TaskSettings(limit=items),
                                   refresh=getattr(args, "fresh", False))
        for t, r in res.items():
            result[t] = {k: v for k, v in r.items() if k not in PER_ITEM}
            if not args.json:
                print(f"{name}: {t} acc {r['acc']:.4f} +- {r['acc_stderr']:.4f}, acc_norm {r['acc_norm']:.4f} "
                      f"+- {r['acc_norm_stderr']:.4f} ({r['n_items']} items)"
                      f"{' [measurement from cache]' if r['from_cache'] else ''}")
    result["eval_s"] = round(time.perf_counter() - t0, 2)
    return result


def cmd_quantize(args) -> dict:
    from .bench import resolve_device
    from safetensors.torch import save_model
    from .models import load_model
    if args.data_dir:
        os.environ["SLMQUANT_DATA"] = args.data_dir
    model, tok = load_model(args.model, device=resolve_device(args.device))
    qmodel, record = _quantized(args, model, tok, args.method, args.bits)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        save_model(qmodel, str(out / "model.safetensors"))
        (out / "slmquant_cell.json").write_text(json.dumps(record, indent=1, default=str))
        record["out"] = str(out)
    if not args.json:
        c = record["cost"]
        print(f"{record['cell']}: quantized in {c['wall_s']:.1f} s, peak {c['peak_mem_bytes'] / 2**20:.0f} MiB "
              f"({c['mem_counter']}){' [from cache]' if record['from_cache'] else ''}")
    return record


def cmd_cache(args) -> dict:
    from .cells import CellCache
    cache = CellCache()
    removed = cache.prune(int(args.max_gb * 2**30)) if args.max_gb is not None else []
    entries = cache.entries()
    total = sum(e["bytes"] for e in entries)
    if not args.json:
        print(f"cell cache {cache.root}: {len(entries)} entries, {total / 2**30:.2f} GiB"
              + (f"; removed {len(removed)} least recently used" if removed else ""))
        for e in entries[:args.show]:
            print(f"  {time.strftime('%Y-%m-%d %H:%M', time.localtime(e['last_used']))}  "
                  f"{e['bytes'] / 2**20:7.0f} MiB  {e['cell']}")
    return {"root": str(cache.root), "entries": len(entries), "bytes": total, "removed": len(removed)}


def _choices(given: str | None, default: list[str], what: str, allowed=None) -> list[str]:
    """A comma-separated selection (None: `default`), every name checked before any model loads."""
    if not given:
        return default
    names = [n.strip() for n in given.split(",") if n.strip()]
    bad = [n for n in names if n not in (allowed or default)]
    if bad or not names:
        raise SlmquantError(f"unknown {what} {', '.join(bad) or repr(given)}: choose from "
                            f"{', '.join(allowed or default)}")
    return list(dict.fromkeys(names))                 # repeated names once


def _bench(args, models: list[str], methods: list[str], bits: list[str], tracks: tuple[int, ...],
           cells=None, tasks=None) -> list[dict]:
    """Run a matrix through slmquant.bench, rewriting the report after every cell."""
    from .bench import resolve_device, run_bench
    from .report import write_report
    items = -1 if args.task_items is None else _task_items(args.task_items)
    device = resolve_device(args.device)                                   # checked before anything is written
    from . import data
    root = data.data_dir(args.data_dir)                             # the data, before any model loads
    missing = [rel for rel in data.CHECKSUMS if not (root / rel).is_file()]
    if missing:
        raise SlmquantError(f"{len(missing)} data file(s) missing in {root}, first: {missing[0]} "
                            "(`slmquant data` checks every file)")
    if args.data_dir:
        os.environ["SLMQUANT_DATA"] = args.data_dir
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paper = _paper_or_none()

    def report(_res):
        try:
            write_report(out, paper)                               # the tables grow cell by cell
        except Exception as e:                                     # noqa: BLE001 -- never lose the run to its report
            print(f"slmquant: the report could not be written ({type(e).__name__}: {e})", file=sys.stderr)
    results = run_bench(models, methods, bits, tracks, args.profile, out, device=device,
                        force=args.force, task_items=items, data_dir=args.data_dir, after_cell=report,
                        cells=cells, tasks=tasks, embeddings=getattr(args, "embeddings", "float16"))
    report(None)
    return results


def _rows(results: list[dict]) -> list[dict]:
    """One summary row per cell (ratios to the float cell of the same model)."""
    fppl = {r["model"]: r["wikitext2"]["ppl"] for r in results if r["method"] == "none" and "wikitext2" in r}
    rows = []
    for r in results:
        w, i = r.get("wikitext2") or {}, r.get("infer") or {}
        q = (r.get("quantization") or {}).get("cost") or {}
        rows.append({"model": r["model"], "cell": r.get("name") or ("float" if r["method"] == "none" else f"{r['method']}-{r['bits']}"),
                     "wikitext2_ppl": w.get("ppl"), "tokens": w.get("n_tokens"),
                     "ppl_ratio": w["ppl"] / fppl[r["model"]] if w and r["model"] in fppl else None,
                     "arc_e": (r.get("arc_easy") or {}).get("acc_norm"),
                     "hellaswag": (r.get("hellaswag") or {}).get("acc_norm"),
                     "slmq_infer": i.get("slmq_infer"), "quant_s": q.get("wall_s"), "elapsed_s": r.get("elapsed_s")})
    return rows


def _finish(args, results: list[dict]) -> dict:
    rows = _rows(results)
    if not args.json:
        _print_table(rows, ["model", "cell", "wikitext2_ppl", "ppl_ratio", "tokens", "arc_e", "hellaswag",
                            "slmq_infer", "quant_s", "elapsed_s"])
        print(f"results in {args.out}/ (tables and plots: {args.out}/report.md)")
    return {"profile": args.profile, "rows": rows, "out": str(args.out)}


def cmd_bench(args) -> dict:
    """The SLMQuant matrix: models x methods x bits x tracks, resumable (slmquant.bench)."""
    from .bench import parse_cells, parse_tracks
    from .methods import all_methods
    from .tasks import TASKS
    from .models import resolve
    models = list(dict.fromkeys(m.strip() for m in (args.models or "smollm2-135m").split(",") if m.strip()))
    for m in models:
        resolve(m)                                     # an unknown model fails here, before any load
    methods = _choices(args.methods, list(all_methods()), "method")
    bits = _choices(args.bits, ["w8a8", "w4a8"], "bits", allowed=("w8a8", "w4a8", "w4a16"))
    tracks = parse_tracks(args.tracks)
    cells = parse_cells(args.cells) if args.cells else None
    tasks = None if args.tasks is None else tuple(() if args.tasks == "none" else
                                                  _choices(args.tasks, list(TASKS), "task"))
    return _finish(args, _bench(args, models, methods, bits, tracks, cells, tasks))


def cmd_run(args) -> dict:
    """The main job: the float model and every registered method at W8A8 and W4A8 on the bundled
    default model, all three tracks and the three scores, the report rewritten after each cell.
    Each cell's result is written as it finishes and reused on the next run, so an interrupted run
    resumes."""
    from .bench import TRACKS
    from .methods import all_methods
    methods = _choices(args.methods, list(all_methods()), "method")
    bits = _choices(args.bits, ["w8a8", "w4a8"], "bits", allowed=("w8a8", "w4a8", "w4a16"))
    return _finish(args, _bench(args, [args.model or "smollm2-135m"], methods, bits, TRACKS))


def cmd_profile(args) -> dict:
    """Track 2 for one cell, side by side with the float model in the same process: the cell as a real
    low-bit model (integer weights, integer kernels), prefill and decode speed, peak memory, storage
    against the float16 checkpoint (tied weights once), MACs, slmq_infer (tokens/s and MACs variants)."""
    from .bench import resolve_device
    from . import real
    from .models import load_model
    if args.data_dir:
        os.environ["SLMQUANT_DATA"] = args.data_dir
    model, tok = load_model(args.model, device=resolve_device(args.device))
    qmodel, record = _quantized(args, model, tok, args.method, args.bits)
    from .bench import track2
    t2, rmodel = track2(model, qmodel, tok, args.embeddings, args.iters, args.warmup, args.decode_tokens)
    if args.save:
        real.save_real(rmodel, tok, args.save, record)
    result = {"model": args.model, "source": model.slmquant_source.to_dict(), "cell": record["cell"], **t2,
              "quantization": record}
    t_float, t_real = t2["float"], t2["real"]
    s_real = t_real["storage"]
    if not args.json:
        r = result["ratios"]
        print(f"{record['cell']} ({args.embeddings} embeddings; kernels {result['kernels']}) on {result['device']}")
        print(f"  prefill {t_real['prefill_tok_s']:.1f} tok/s vs float {t_float['prefill_tok_s']:.1f} "
              f"(x{r['prefill_speedup']:.2f}); decode {t_real['decode_tok_s']:.1f} vs {t_float['decode_tok_s']:.1f} "
              f"(x{r['decode_speedup']:.2f})")
        print(f"  peak memory x{r['memory']:.3f}; storage {s_real['bytes'] / 2**20:.1f} MiB = "
              f"x{r['storage_vs_float16']:.3f} of float16 (x{r['storage_vs_float16_without_embeddings']:.3f} "
              f"without embeddings)")
        print(f"  MACs: {t_real['macs']['int'] / 1e9:.2f} G integer + {t_real['macs']['float'] / 1e9:.2f} G float "
              f"(float model {t_float['macs']['total'] / 1e9:.2f} G); slmq_infer {result['slmq_infer']:.1f} "
              f"(MACs variant {result['slmq_infer_macs']:.1f})")
    return result


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    common.add_argument("--data-dir", default=None, help="data directory (default: $SLMQUANT_DATA)")
    p = argparse.ArgumentParser(prog="slmquant", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("models", parents=[common], help="aliases, architecture, source, cached or not")
    sub.add_parser("data", parents=[common], help="data directory and checksum status of each file")
    c = sub.add_parser("cache", parents=[common], help="size of the cell cache; --max-gb prunes it (LRU)")
    c.add_argument("--max-gb", type=float, default=None, help="remove least recently used cells beyond this")
    c.add_argument("--show", type=int, default=10, help="list this many most recent entries")
    e = sub.add_parser("eval", parents=[common], help="evaluate a model, float or quantized")
    e.add_argument("model")
    e.add_argument("method", nargs="?", default=None, help="none, rtn, ...")
    e.add_argument("bits", nargs="?", default=None, help="w8a8, w4a8, w4a16, ...")
    e.add_argument("--tasks", default="wikitext2", help="comma-separated: wikitext2, arc_easy, arc_challenge, piqa, hellaswag, mmlu_cloze, mmlu")
    e.add_argument("--limit", default=None, help="N (a seeded sample of N windows/items) or 'all'")
    e.add_argument("--fresh", action="store_true", help="measure again even when a cached measurement exists")
    e.add_argument("--real", nargs="?", const="float16", choices=["float16", "int8"], default=None,
                   help="score the cell as a real low-bit model (integer weights and kernels); the value "
                        "is how its embeddings are stored (default float16)")
    qz = sub.add_parser("quantize", parents=[common], help="quantize one cell (cached) and optionally save it")
    qz.add_argument("model")
    qz.add_argument("method")
    qz.add_argument("bits")
    qz.add_argument("--out", default=None, help="folder for model.safetensors and slmquant_cell.json")
    pf = sub.add_parser("profile", parents=[common], help="track 2: a cell as a real low-bit model against float")
    pf.add_argument("model")
    pf.add_argument("method")
    pf.add_argument("bits")
    pf.add_argument("--embeddings", choices=["float16", "int8"], default="float16")
    pf.add_argument("--iters", type=int, default=100, help="timed prefill iterations (default 100)")
    pf.add_argument("--warmup", type=int, default=10)
    pf.add_argument("--decode-tokens", type=int, default=128)
    pf.add_argument("--save", default=None, help="folder to save the real model in (load it with slmquant.real.load_real)")
    for q in (e, qz, pf):
        q.add_argument("--set", action="append", metavar="KEY=VALUE", help="any field of the method's config")
        q.add_argument("--group-size", type=int, default=None)
    b = sub.add_parser("bench", parents=[common], help="the SLMQuant matrix: models x methods x bits x tracks")
    b.add_argument("--models", default=None, help="comma-separated models (default: smollm2-135m)")
    b.add_argument("--tracks", default=None, help="comma-separated tracks: 1 accuracy, 2 inference, 3 cost (default: all)")
    b.add_argument("--cells", default=None, help="METHOD:BITS[:KEY=VALUE;...],... instead of --methods x --bits "
                                                 "(ablations: gptq:w4a16:act_order=false)")
    b.add_argument("--embeddings", choices=["float16", "int8"], default="float16",
                   help="track 2: how the real model stores its embeddings (default float16)")
    b.add_argument("--tasks", default=None, help="track 1's tasks, comma-separated, or 'none' for WikiText-2 "
                                                 "only (default: the five of slmq_perf)")
    r = sub.add_parser("run", parents=[common], help="the main job on the bundled default model: every method, W8A8 "
                                                    "and W4A8, all three tracks")
    r.add_argument("--model", default=None)
    for q in (e, qz, pf, r, b):
        q.add_argument("--profile", choices=["quick", "paper", "smoke"], default="quick",
                       help="quick (default): 40 windows, 120 items per task, reduced calibration; smoke: 4 "
                            "windows, 15 items, the test suite's calibration, minutes; paper: every window and "
                            "item, the papers' settings")
        q.add_argument("--device", default="auto")
    for q in (r, b):
        q.add_argument("--out", default="results", help="folder for the results (default: results/)")
        q.add_argument("--methods", default=None, help="comma-separated methods (default: every registered one)")
        q.add_argument("--bits", default=None, help="comma-separated bits widths (default: w8a8,w4a8)")
        q.add_argument("--task-items", default=None, help="items per task: N or 'all' (default: the profile's)")
        q.add_argument("--force", action="store_true", help="measure the requested tracks of every cell again, even "
                       "when its result exists (cells stay cached: track 3 keeps the cost of the cell's build)")
    rp = sub.add_parser("report", parents=[common], help="tables (Markdown, CSV) and plots of a run's results folder")
    rp.add_argument("folder", help="a folder written by `slmquant run`")
    rp.add_argument("--readme", default=None, help="also rewrite this README's generated results section")
    return p


def _paper_or_none() -> dict | None:
    from .scores import paper_tables
    try:
        return paper_tables()
    except (SlmquantError, ValueError):                # missing, or not JSON: the report goes without
        return None


def cmd_report(args) -> dict:
    """Tables 1-4 and Figures 3-4 of a results folder, with the paper's values beside ours."""
    from .report import load_groups, write_report
    folder = Path(args.folder)
    if not folder.is_dir():
        raise SlmquantError(f"{folder}: no such folder (write one with `slmquant run --out {folder}`)")
    if not load_groups(folder):
        raise SlmquantError(f"{folder}: no results of `slmquant bench` or `slmquant run` in it")
    reps = write_report(folder, _paper_or_none())
    if args.readme:
        from .report import update_readme
        update_readme(Path(args.readme), reps, folder)
    if not args.json:
        print((folder / "report.md").read_text())
    return {"folder": str(folder), "groups": [{"model": r["model"], "device_class": r["device_class"],
                                               "cells": [x["cell"] for x in r["rows"]]} for r in reps],
            "files": sorted(p.name for p in folder.glob("*") if p.suffix in (".md", ".csv", ".png"))}


COMMANDS = {"bench": cmd_bench, "cache": cmd_cache, "models": cmd_models, "data": cmd_data, "eval": cmd_eval, "quantize": cmd_quantize, "run": cmd_run,
            "profile": cmd_profile, "report": cmd_report}


def _quiet_imports() -> None:
    # torchao (imported by transformers) logs optional CUDA extensions it cannot load on a CPU
    # machine, and torch warns about its enums: noise on stderr, where errors must stand alone.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_imports()
    try:
        result = COMMANDS[args.command](args)
    except SlmquantError as e:
        if args.debug:
            raise
        print(f"slmquant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slmquant: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
