"""`slmquant bench`: the SLMQuant matrix, models x methods x bits x tracks, cell by cell.

Each cell's result is one JSON file, `OUT/<device class>/<model>/<cell>.json` (`float.json`,
`<method>-<bits>.json`), rewritten atomically after each of its tracks: a crash or Ctrl-C loses at
most the track in progress, and a rerun skips what is finished (unless `force`). Cells and
measurements go through the same caches as the test suite (cells.CellCache, measure.MeasureCache),
so a cell built by one is not built again by the other.

Tracks (PROTOCOL.md sections 4-6):
1. accuracy: WikiText-2 perplexity on the profile's windows and the five tasks of slmq_perf on the
   profile's item sample; the float cell also records the model's per-layer outlier statistics;
2. inference cost: the cell as a real low-bit model against the float model in the same process
   (prefill and decode tokens/s, peak memory, storage, MACs, slmq_infer in both variants);
3. quantization cost: the wall time and peak memory of building the cell, as measured when it was
   built (a cell read from the cache keeps the cost of its build, on the device that built it).

A result records its schema version, every setting, the package versions, the thread count, the
CPU's instruction set and the device; results of different device classes sit in different
folders and are never compared with each other (`slmquant report` groups them apart). A matrix
splits across machines by selecting models, methods and bits; copying the parts' OUT folders into
one merges them."""
from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .cli import columns
from .errors import SlmquantError
from .files import write_text_atomic

SCHEMA = 1
TRACKS = (1, 2, 3)
BITS = ("w8a8", "w4a8", "w4a16")
# The five tasks of slmq_perf (beside WikiText-2) and each profile's item sample per task.
TASK_ITEMS = {"smoke": 15, "quick": 120, "paper": None}
# Track 2 timing per profile: timed prefill passes of 128 tokens, warm-up passes, decoded tokens.
TRACK2 = {"smoke": {"iters": 6, "warmup": 1, "decode_tokens": 16},
          "quick": {"iters": 30, "warmup": 5, "decode_tokens": 64},
          "paper": {"iters": 100, "warmup": 10, "decode_tokens": 128}}
OUTLIER_WINDOWS = (4, 512)         # calibration windows (count, tokens) for the outlier statistics

# Plan estimates, seconds on a 2-core CPU for SmolLM2-135M (Qwen2.5-0.5B: x QWEN_FACTOR), measured
# on this project's development machine (docs/run_timing.md): building a cell per profile, scoring
# one WikiText-2 window of 2048 tokens, one task item, one track-2 cell.
BUILD_S = {"smoke": {"rtn": 5, "gptq": 70, "smoothquant": 45, "omniquant": 115, "spinquant": 150},
           "quick": {"rtn": 5, "gptq": 455, "smoothquant": 180, "omniquant": 830, "spinquant": 650},
           "paper": {"rtn": 5, "gptq": 1500, "smoothquant": 600, "omniquant": 36000, "spinquant": 25000}}
# SpinQuant's paper build is scaled from the quick one, not measured: 100 steps of 8 windows of 2048
# tokens are 64 times the quick profile's learning (about 6 min), plus GPTQ's paper calibration.
WINDOW_S, ITEM_S, TRACK2_S = 6.7, 0.49, {"smoke": 30, "quick": 50, "paper": 180}
QWEN_FACTOR = 4.0


@dataclass(frozen=True)
class Spec:
    """One cell of the matrix: method "none" is the float model; settings: (key, value) pairs that
    override the profile's (an ablation cell, `--cells gptq:w4a16:act_order=false`)."""
    model: str
    method: str
    bits: str | None
    settings: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        if self.method == "none":
            return "float"
        return f"{self.method}-{self.bits}" + "".join(f"-{k}={v}" for k, v in self.settings)

    def config(self, profile: str):
        from .methods import make_config
        from .profiles import profile_settings
        return make_config(self.method, self.bits, {**profile_settings(self.method, profile, self.bits), **dict(self.settings)})


def parse_cells(given: str) -> list[tuple[str, str, tuple[tuple[str, str], ...]]]:
    """`METHOD:BITS[:KEY=VALUE;KEY=VALUE],...` -> (method, bits, settings), each config checked
    (unknown method, bits or field fails here, before any model loads)."""
    out = []
    for spec in (c.strip() for c in given.split(",") if c.strip()):
        parts = spec.split(":", 2)
        if len(parts) < 2:
            raise SlmquantError(f"--cells takes METHOD:BITS[:KEY=VALUE;...], got {spec!r}")
        pairs = [kv for kv in (parts[2].split(";") if len(parts) == 3 else []) if kv]
        if any("=" not in kv for kv in pairs):
            raise SlmquantError(f"--cells: settings are KEY=VALUE separated by ';', got {spec!r}")
        settings = tuple(sorted((k.strip(), v.strip()) for k, v in (kv.split("=", 1) for kv in pairs)))
        if parts[1] not in BITS:
            raise SlmquantError(f"--cells {spec!r}: bits {parts[1]!r}, choose from {', '.join(BITS)}")
        Spec("", parts[0], parts[1], settings).config("paper")
        out.append((parts[0], parts[1], settings))
    return list(dict.fromkeys(out))                       # a repeated cell once


def plan(models: list[str], methods: list[str], bits: list[str],
         cells: list[tuple[str, str, tuple]] | None = None) -> list[Spec]:
    """Per model, the float cell first, then every method at every bits width (or the given cells)."""
    rows = cells if cells is not None else [(me, b, ()) for me in methods for b in bits]
    return [s for m in models for s in [Spec(m, "none", None)] + [Spec(m, me, b, st) for me, b, st in rows]]


def parse_tracks(given: str | None) -> tuple[int, ...]:
    if not given:
        return TRACKS
    try:
        tracks = sorted({int(t) for t in given.split(",") if t.strip()})
    except ValueError:
        tracks = []
    if not tracks or any(t not in TRACKS for t in tracks):
        raise SlmquantError(f"--tracks takes a comma-separated subset of 1,2,3, got {given!r}")
    return tuple(tracks)


def resolve_device(name: str) -> str:
    """'auto' (CUDA where there is one), 'cpu' or 'cuda[:N]', checked before any model loads; a
    CUDA device becomes the current one (peak memory, synchronisation and cache keys read it)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not name.startswith("cuda"):
        raise SlmquantError(f"--device {name!r}: choose auto, cpu or cuda[:N]")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SlmquantError(f"--device {name}: CUDA is not available here")
        torch.cuda.set_device(torch.device(name))
    return name


def device_class(device: str) -> str:
    """The folder a device's results go to: `cpu`, or the CUDA device's name (`nvidia-h200`)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device)).lower().replace(" ", "-")
    return "cpu"


def versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "lm-eval", "torchao", "gguf", "slmquant"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def model_slug(model: str) -> str:
    """A model spec as one folder or file name: an alias as it is, a Hub id `org/name` as
    `org_name`, a local folder or `.gguf` file by its name."""
    p = Path(model).expanduser()
    if ("/" in model or model.endswith(".gguf")) and p.exists():
        return p.name
    return model.replace("/", "_").replace(":", "_")


def machine() -> dict:
    """What moves a measurement besides the code: threads, instruction set, device, versions."""
    return {"threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), "system": platform.system(),
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "versions": versions()}


def _code(*modules) -> str:
    return hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in modules)).hexdigest()[:12]


def identity(spec: Spec, profile: str, task_items: int | None, tasks: tuple[str, ...] = (),
             embeddings: str = "float16") -> dict[str, str] | None:
    """What a saved result must match to be reused, per track: the model's source, the profile and
    the cell's cache key (every setting and the quantizer's code) for all; track 1 adds its sample
    sizes and the scoring and task code; track 2 its timing settings, the embeddings' format and
    the real-model code. None where the source is only known after loading (a Hub id): such cells
    are always evaluated (the caches keep that cheap)."""
    from . import evaluate, infer, outliers, real
    from . import tasks as T
    from .cells import Cell
    from .models import resolve
    source = resolve(spec.model)[2]
    if source is None:
        return None
    cell = "float" if spec.method == "none" else Cell(spec.model, spec.method, spec.config(profile)).key(source.key)
    base = f"{source.key}:{profile}:schema={SCHEMA}:{cell}"
    t2 = TRACK2[profile]
    return {"cell": base,
            "1": (f"{base}:items={task_items}:tasks={'+'.join(sorted(tasks))}:{evaluate.scoring_code_hash()}"
                  f":{T.code_hash()}:{T.lm_eval_version()}:{_code(outliers)}"),
            "2": f"{base}:{t2['iters']},{t2['warmup']},{t2['decode_tokens']}:{embeddings}:{_code(infer, real)}",
            "3": base}


def read_result(path: Path) -> dict | None:
    """A saved result, or None when it is missing or unreadable (an interrupted write)."""
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return res if isinstance(res, dict) else None


def reusable(res: dict | None, want: dict | None) -> bool:
    """A saved result of the same cell (its other tracks can be kept)."""
    return (res is not None and want is not None and isinstance(res.get("identity"), dict)
            and res["identity"].get("cell") == want["cell"])


def todo(res: dict | None, want: dict | None, spec: Spec, tracks: tuple[int, ...]) -> tuple[int, ...]:
    """The tracks of a cell still to run, given its saved result (the float cell has track 1 only):
    those not done, or done under another identity (settings, sample sizes, code)."""
    tracks = tuple(t for t in tracks if not (spec.method == "none" and t in (2, 3)))
    if not reusable(res, want):
        return tracks
    done = set(res.get("tracks_done", []))
    return tuple(t for t in tracks if t not in done or res["identity"].get(str(t)) != want[str(t)])


def estimate_s(spec: Spec, tracks: tuple[int, ...], profile: str, task_items: int | None, cached: bool,
               n_windows: int, n_tasks: int = 5) -> float:
    """Rough seconds for a cell on a 2-core CPU (the plan's estimate; docs/run_timing.md)."""
    f = QWEN_FACTOR if "qwen" in spec.model else 1.0
    s = 0.0
    if spec.method != "none" and not cached and tracks:
        s += BUILD_S[profile].get(spec.method, 300)
    if 1 in tracks:
        s += n_windows * WINDOW_S + n_tasks * (task_items or 2000) * ITEM_S
    if 2 in tracks and spec.method != "none":
        s += TRACK2_S[profile]
    return s * f


def _clock(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600} h {s % 3600 // 60:02d} min" if s >= 3600 else f"{s // 60} min {s % 60:02d} s"


def _note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def track1(res: dict, model, tok, model_key: str, profile: str, task_items: int | None, fresh: bool,
           data_dir: str | None, tasks: tuple[str, ...]) -> None:
    from . import data, evaluate
    from .measure import MeasureCache
    from .profiles import profile_windows
    from .tasks import PER_ITEM, TaskSettings
    tokens = evaluate.wikitext2_tokens(tok, "test", data.data_dir(data_dir))
    res["wikitext2"] = MeasureCache().wikitext2(model_key, lambda: model, tokens, limit=profile_windows(profile),
                                                refresh=fresh)
    got = MeasureCache().tasks(model_key, lambda: (model, tok), list(tasks),
                               TaskSettings(limit=task_items), refresh=fresh) if tasks else {}
    for t, r in got.items():
        res[t] = {k: v for k, v in r.items() if k not in PER_ITEM}


def outliers(model, tok, data_dir: str | None) -> dict:
    from . import data
    from .outliers import layer_outliers
    n, seqlen = OUTLIER_WINDOWS
    windows = data.calib_windows(tok, n, seqlen, seed=0, root=data.data_dir(data_dir))
    return {"windows": n, "seqlen": seqlen, "split": "wikitext2 validation (the calibration windows, seed 0)",
            "layers": layer_outliers(model, windows)}


def track2(model, qmodel, tok, embeddings: str, iters: int, warmup: int, decode_tokens: int) -> tuple[dict, object]:
    """The cell as a real low-bit model (integer weights and kernels) against the float model, in
    one process: prefill timed interleaved (a slow spell of a shared machine hits both alike), then
    each alone for decode and peak memory; storage against the float16 checkpoint; MACs. `qmodel`
    is converted in place (only the float and the real model are in memory while measuring).
    Returns (the measurements, the real model)."""
    from . import infer, real, scores
    rmodel = real.to_real(qmodel, embeddings=embeddings)
    ids = infer.fixed_input(tok).to(next(model.parameters()).device)
    kw = dict(iters=iters, warmup=warmup, decode_tokens=decode_tokens)
    tps_float, tps_real = infer.prefill_side_by_side([model, rmodel], ids, iters, warmup)
    t_float = infer.measure(model, ids, **kw, prefill_tok_s=tps_float).to_dict()
    t_real = infer.measure(rmodel, ids, **kw, prefill_tok_s=tps_real).to_dict()
    s_float, s_real = real.storage(model), real.storage(rmodel)
    out = {"embeddings": embeddings, "kernels": real.kernel_paths(rmodel), "device": t_float["device"],
           "settings": kw, "float": {**t_float, "storage": s_float}, "real": {**t_real, "storage": s_real},
           "ratios": {"prefill_speedup": t_real["prefill_tok_s"] / t_float["prefill_tok_s"],
                      "decode_speedup": t_real["decode_tok_s"] / t_float["decode_tok_s"],
                      "memory": t_real["peak_mem_bytes"] / t_float["peak_mem_bytes"],
                      "storage_vs_float16": s_real["bytes"] / s_float["bytes"],
                      "storage_vs_float16_without_embeddings":
                          s_real["bytes_without_embeddings"] / s_float["bytes_without_embeddings"]},
           "slmq_infer": scores.slmq_infer((t_float["peak_mem_bytes"], t_real["peak_mem_bytes"]),
                                           (t_float["prefill_tok_s"], t_real["prefill_tok_s"]),
                                           (s_float["bytes"], s_real["bytes"])),
           "slmq_infer_macs": scores.slmq_infer_macs((t_float["peak_mem_bytes"], t_real["peak_mem_bytes"]),
                                                     (t_float["macs"]["total"], t_real["macs"]["total"]),
                                                     (s_float["bytes"], s_real["bytes"]))}
    return out, rmodel


def summary(res: dict) -> str:
    """One line per finished cell."""
    parts = []
    w = res.get("wikitext2")
    if w:
        parts.append(f"ppl {w['ppl']:.3f} ({w['n_tokens']} tokens)")
    from .profiles import PR_GATE_TASKS
    scored = [t for t in PR_GATE_TASKS if t in res]
    if scored:
        accs = [res[t]["acc_norm"] for t in scored]
        parts.append(f"mean acc_norm {sum(accs) / len(accs):.3f} over {len(scored)} tasks "
                     f"({res[scored[0]]['n_items']} items each)")
    i = res.get("infer")
    if i:
        parts.append(f"prefill x{i['ratios']['prefill_speedup']:.2f}, storage x{i['ratios']['storage_vs_float16']:.3f}, "
                     f"slmq_infer {i['slmq_infer']:.0f}")
    c = (res.get("quantization") or {}).get("cost")
    if c:
        parts.append(f"quantized in {c['wall_s']:.0f} s, peak {c['peak_mem_bytes'] / 2**20:.0f} MiB"
                     + (" (from cache)" if res["quantization"].get("from_cache") else ""))
    return "; ".join(parts) or "nothing measured"


def run_bench(models: list[str], methods: list[str], bits: list[str], tracks: tuple[int, ...], profile: str,
              out: Path, device: str = "cpu", force: bool = False, task_items: int | None = -1,
              embeddings: str = "float16", data_dir: str | None = None, after_cell=None,
              cells: list[tuple[str, str, tuple]] | None = None, tasks: tuple[str, ...] | None = None) -> list[dict]:
    """Run the matrix; returns the results in plan order. after_cell(result) is called after every
    cell (the report is rewritten there). cells: (method, bits, settings) instead of methods x bits;
    tasks: the multiple-choice tasks of track 1 (default: the five of slmq_perf; () for none)."""
    from .cells import Cell, CellCache
    from .measure import float_key
    from .models import load_model, resolve
    from .profiles import PR_GATE_TASKS, profile_windows
    items = TASK_ITEMS[profile] if task_items == -1 else task_items
    tasks = tuple(PR_GATE_TASKS) if tasks is None else tuple(tasks)
    specs = plan(models, methods, bits, cells)
    device = resolve_device(device)
    dclass = device_class(device)
    paths = {s: out / dclass / model_slug(s.model) / f"{s.name}.json" for s in specs}
    for p in {p.parent for p in paths.values()}:
        p.mkdir(parents=True, exist_ok=True)
    wants = {s: identity(s, profile, items, tasks, embeddings) for s in specs}
    todos = {s: todo(None if force else read_result(paths[s]), wants[s], s, tracks) for s in specs}
    # the plan, with an estimate, before any model loads
    n_windows = profile_windows(profile) or 140              # paper: every window, about 140 of 2048
    cache = CellCache()
    total = 0.0
    rows = []
    for s in specs:
        src = resolve(s.model)[2]
        cached = s.method == "none" or (src is not None and cache.record(
            Cell(s.model, s.method, s.config(profile)), src.key) is not None)
        est = estimate_s(s, todos[s], profile, items, cached, n_windows, len(tasks)) if todos[s] else 0.0
        total += est
        state = ("done" if not todos[s] else f"tracks {','.join(map(str, todos[s]))}"
                 + ("" if s.method == "none" else ", cell cached" if cached else ", to build"))
        rows.append((s.model, s.name, state, f"~{_clock(est)}"))
    _note(f"slmquant bench: {len(specs)} cells, profile {profile} (WikiText-2: {n_windows} windows of 2048; "
          f"tasks: {', '.join(tasks) or 'none'}, {items or 'all'} items each; track 2: {TRACK2[profile]['iters']} timed prefills), device "
          f"{device}, results in {out / dclass}/")
    _note(columns(rows))
    _note(f"  estimated {_clock(total)} on a 2-core CPU (docs/run_timing.md); on other machines, a guide only")
    results, loaded = [], {}
    for k, s in enumerate(specs, 1):
        res = read_result(paths[s])
        if not reusable(res, wants[s]):
            res = None
        if not todos[s]:
            if res is None:                                      # the float cell on tracks 2-3 only
                _note(f"[{k}/{len(specs)}] {s.model} {s.name}: nothing to measure on tracks "
                      f"{','.join(map(str, tracks))}")
                continue
            results.append(res)
            _note(f"[{k}/{len(specs)}] {s.model} {s.name}: done earlier; {summary(res)}")
            continue
        if res is None:                                          # else keep its other tracks
            res = {"schema": SCHEMA, "name": s.name, "identity": wants[s] or {}, "tracks_done": [],
                   "model": s.model, "method": s.method, "bits": s.bits or "w16a16", "profile": profile}
        res["tracks_done"] = [t for t in res["tracks_done"] if t not in todos[s]]
        _note(f"[{k}/{len(specs)}] {s.model} {s.name}: tracks {','.join(map(str, todos[s]))}")
        t0 = time.perf_counter()
        if s.model not in loaded:
            loaded.clear()                                       # one float model in memory at a time
            model = tok = None
            torch.manual_seed(0)
            loaded[s.model] = load_model(s.model, device=device)
        model, tok = loaded[s.model]
        res.update(source=model.slmquant_source.to_dict(), device=str(next(model.parameters()).device),
                   device_class=dclass, machine=machine(),
                   settings={"tasks": list(tasks), "task_items": items, "track2": TRACK2[profile],
                             "embeddings": embeddings})

        def mark(t: int) -> None:                                # track t finished under today's identity
            res["tracks_done"] = sorted(set(res["tracks_done"]) | {t})
            res["identity"][str(t)] = (wants[s] or {}).get(str(t))
            res.setdefault("track_machines", {})[str(t)] = res["machine"]   # a later run may redo other tracks elsewhere
            write_text_atomic(paths[s], json.dumps(res, indent=1, default=str))
        qmodel, model_key = model, float_key(model)
        if s.method != "none":
            cell = Cell(s.model, s.method, s.config(profile))
            qmodel, record, built = cache.get(cell, model, tok)
            model_key = cell.key(model.slmquant_source.key)
            res.update(cell=record["cell"], cell_settings=record["settings"],
                       quantization={**record, "from_cache": not built, "key": model_key})
            mark(3)
        if 1 in todos[s]:
            track1(res, qmodel, tok, model_key, profile, items, force, data_dir, tasks)
            write_text_atomic(paths[s], json.dumps(res, indent=1, default=str))   # kept if what follows fails
            if s.method == "none":
                res["outliers"] = outliers(model, tok, data_dir)
            mark(1)
        if 2 in todos[s] and s.method != "none":
            t2 = TRACK2[profile]
            res["infer"], qmodel = track2(model, qmodel, tok, embeddings, t2["iters"], t2["warmup"],
                                          t2["decode_tokens"])
            mark(2)
        res["elapsed_s"] = round(time.perf_counter() - t0, 2)
        write_text_atomic(paths[s], json.dumps(res, indent=1, default=str))
        del qmodel
        results.append(res)
        _note(f"[{k}/{len(specs)}] {s.model} {s.name}: {summary(res)}; {res['elapsed_s']:.0f} s")
        if after_cell is not None:
            after_cell(res)
    return results
