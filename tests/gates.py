"""What a cell must achieve, and the numbers that say so, kept in one place.

Every ceiling is RTN's value measured on this machine (torch 2.13.0+cpu, float32) with a stated
margin: every method must do at least as well as round-to-nearest with the same weight settings.
A cell scoring better than float by more than SUSPICIOUS is flagged: quantization that "improves"
a model usually means the quantizer did not run."""
from __future__ import annotations

from slmquant import evaluate
from slmquant.cells import Cell

SUSPICIOUS = 0.995          # ppl_ratio below this: a suspicious improvement

# Default tier (whole SmolLM2, first 4 windows of 256 tokens), keyed by (scheme, weight setting).
# Measured RTN ppl_ratio / sqnr_db / kl in the comments; ceilings = measured x (1 + margin).
# Margins: ratio ceilings +6% at W4 and +1.5 points at W8 (RTN with flooring instead of rounding
# measures x1.055 at W8A8 and must fail), SQNR floors -15%, KL ceilings +20%.
DEFAULT_GATES: dict[tuple[str, str], dict] = {
    # measured RTN: ppl_ratio 1.0256, sqnr 20.00 dB, kl 0.0382
    ("w8a8", "sym"): {"max_ppl_ratio": 1.04, "min_sqnr_db": 17.0, "max_kl": 0.046},
    # measured RTN: 2.171, 4.68 dB, 0.990
    ("w4a8", "sym"): {"max_ppl_ratio": 2.30, "min_sqnr_db": 4.0, "max_kl": 1.19},
    # measured RTN: 1.697, 3.56 dB, 0.823
    ("w4a8", "asym"): {"max_ppl_ratio": 1.80, "min_sqnr_db": 3.0, "max_kl": 0.99},
    # measured RTN: 2.071, 5.28 dB, 0.938
    ("w4a16", "sym"): {"max_ppl_ratio": 2.20, "min_sqnr_db": 4.5, "max_kl": 1.13},
    # measured RTN: 1.653, 3.52 dB, 0.788
    ("w4a16", "asym"): {"max_ppl_ratio": 1.75, "min_sqnr_db": 3.0, "max_kl": 0.95},
    # measured RTN: 1.341, 5.95 dB, 0.554
    ("w4a16", "sym-g64"): {"max_ppl_ratio": 1.42, "min_sqnr_db": 5.0, "max_kl": 0.66},
}

# Cells that fail a gate today, with the measured reason. Their snapshot band still gates them; the
# test turns into a failure when they start passing, so that the entry is removed, not forgotten.
KNOWN_FAILURES: dict[str, str] = {
    "smollm2-gptq-w8a8-calib_samples=16-calib_seqlen=512": (
        "GPTQ at 8 bits on 16 x 512 calibration tokens: ppl_ratio 1.051 vs RTN 1.026. The Hessians of "
        "1536-wide down_proj inputs are under-sampled: on held-out tokens its output error is 1.07x "
        "RTN's at 8 x 512 and 0.75x at 64 x 512 (README); the quick tier calibrates GPTQ on 128 x 512"),
    "smollm2-smoothquant-w4a8-calib_samples=16": (
        "SmoothQuant with alpha=0.5 moves activation range into 4-bit weights: ppl_ratio 2.42 vs "
        "RTN 2.17 on the default tier; the alpha search and GPTQ weights are cells of their own"),
    "smollm2-smoothquant-w8a8-calib_samples=32-calib_seqlen=2048": (
        "SmoothQuant W8A8 at alpha 0.5 on SmolLM2 (quick profile): ppl_ratio 1.0161 on AVX-512 (1.017 "
        "on AVX2), short of the issue's 1.5% above float; the alpha-search cell meets it (1.014, README)"),
    "qwen2-gptq-w4a16-calib_seqlen=512-group_size=64": (
        "GPTQ W4A16 g64 on Qwen (quick profile, 128 x 512): 33.180, closing 39% of RTN g64's gap to "
        "float (34.684 vs 30.793), short of the issue's 50%; 31% at 32 x 2048. Sym and asym per "
        "channel close 61% and 74% (README, Qwen GPTQ rows). 39% again on a second calibration "
        "draw; act-order with groups in rounding order (g_idx) 43%; without act-order 49% and 51% "
        "on the two draws (README, Qwen g64 table)"),
}

# Quick-profile tier (first 40 windows of 2048; calibration 32 x 2048, GPTQ 128 x 512): RTN's
# ppl_ratio measured with `scripts/quick_table.py`, keyed by (model, scheme, weight setting).
# Ceilings: +1.5 points at W8, +6% at W4, as in the default tier. Models or settings not measured
# yet have no entry: their cells fail with "no gate defined" until measured, rather than pass ungated.
QUICK_RTN: dict[tuple[str, str, str], float] = {
    ("smollm2-135m", "w8a8", "sym"): 1.0335,     # 21.067 / 20.384
    ("smollm2-135m", "w4a8", "sym"): 2.2641,     # 46.152 / 20.384
    ("smollm2-135m", "w4a8", "asym"): 1.8815,    # 38.352 / 20.384
    ("smollm2-135m", "w4a16", "sym"): 2.1839,    # 44.515 / 20.384
    ("smollm2-135m", "w4a16", "asym"): 1.8192,   # 37.082 / 20.384
    ("smollm2-135m", "w4a16", "sym-g64"): 1.4884,  # 30.339 / 20.384
    ("qwen2.5-0.5b", "w8a8", "sym"): 1.0170,     # 31.316 / 30.792
    ("qwen2.5-0.5b", "w4a8", "sym"): 1.6689,     # 51.390 / 30.792
    ("qwen2.5-0.5b", "w4a8", "asym"): 1.6074,    # 49.495 / 30.792
    ("qwen2.5-0.5b", "w4a16", "sym"): 1.6301,    # 50.194 / 30.792
    ("qwen2.5-0.5b", "w4a16", "asym"): 1.5700,   # 48.343 / 30.792
    ("qwen2.5-0.5b", "w4a16", "sym-g64"): 1.1264,  # 34.684 / 30.793 (AVX-512)
}
QUICK_GATES: dict[tuple[str, str, str], dict] = {
    k: {"max_ppl_ratio": round(r + 0.015 if k[1].startswith("w8") else r * 1.06, 4)} for k, r in QUICK_RTN.items()}

# What a method must reach beyond RTN's ceiling on the quick tier (issue targets), keyed by
# (method, scheme): "max_ppl_ratio", or "gap_closed": the fraction of RTN's gap to float (same model
# and weight setting) the method must close.
QUICK_TARGETS: dict[tuple[str, str], dict] = {
    ("smoothquant", "w8a8"): {"max_ppl_ratio": 1.015},
    ("smoothquant", "w4a8"): {"gap_closed": 0.0},          # strictly better than RTN
    ("gptq", "w4a16"): {"gap_closed": 0.5},
}


def quick_gates(cell: Cell) -> dict:
    """RTN's ceiling for the cell's model and settings, tightened by the method's target."""
    key = (cell.model, cell.cfg.scheme, weight_setting(cell))
    if key not in QUICK_GATES:
        return {}
    g = dict(QUICK_GATES[key])
    t = QUICK_TARGETS.get((cell.method, cell.cfg.scheme), {})
    if "max_ppl_ratio" in t:
        g["max_ppl_ratio"] = min(g["max_ppl_ratio"], t["max_ppl_ratio"])
    if "gap_closed" in t:
        rtn = QUICK_RTN[key]
        g["max_ppl_ratio"] = min(g["max_ppl_ratio"], 1 + (rtn - 1) * (1 - t["gap_closed"]) - 1e-9)
    return g


def weight_setting(cell: Cell) -> str:
    c = cell.cfg
    return ("sym" if c.sym else "asym") + (f"-g{c.group_size}" if c.group_size else "")


def score(model, tokens, tier, reference=None) -> dict:
    r = evaluate.perplexity(model, tokens, seqlen=tier.seqlen, limit=tier.windows, progress=False,
                            reference=reference)
    return {"ppl": r.ppl, **r.extra}


def expect(cell: Cell, failures: list[str]) -> None:
    """Assert the gates: no failure, or, for a known failure, that it still fails (then xfail)."""
    import pytest
    known = KNOWN_FAILURES.get(cell.id)
    if known:
        assert failures, f"{cell.id} now passes its gates: remove it from KNOWN_FAILURES in tests/gates.py"
        pytest.xfail(known)
    assert not failures, failures


def check(cell: Cell, metrics: dict, gates: dict) -> list[str]:
    """The gates a cell fails (empty when it passes). metrics: ppl_ratio, and sqnr_db/kl if scored."""
    out = []
    r = metrics["ppl_ratio"]
    if r < SUSPICIOUS:
        out.append(f"{cell.id}: ppl_ratio {r:.4f} < {SUSPICIOUS}: better than float, suspicious")
    if "max_ppl_ratio" in gates and r > gates["max_ppl_ratio"]:
        out.append(f"{cell.id}: ppl_ratio {r:.4f} > ceiling {gates['max_ppl_ratio']}")
    if "min_sqnr_db" in gates and metrics.get("sqnr_db", float("inf")) < gates["min_sqnr_db"]:
        out.append(f"{cell.id}: logit SQNR {metrics['sqnr_db']:.2f} dB < floor {gates['min_sqnr_db']}")
    if "max_kl" in gates and metrics.get("kl", 0.0) > gates["max_kl"]:
        out.append(f"{cell.id}: KL {metrics['kl']:.4g} > ceiling {gates['max_kl']}")
    if not gates:
        out.append(f"{cell.id}: no gate defined for {cell.cfg.scheme}/{weight_setting(cell)}: add one in tests/gates.py")
    return out


# Track 1 tasks. Recovery = acc_norm of the cell / acc_norm of the float model on the same items
# (slmq_perf's ratio), with a paired confidence bound (slmquant.scores.paired_recovery, z = 2.576):
# a cell fails a floor only when even the upper bound of its recovery lies below it, so a gate on
# a few hundred items does not fail by the luck of the sample.
# Floors from the published Table 1 (both models): every W8A8 cell recovers >= 0.977 per task and
# >= 0.989 on the mean; the working W4A8 cells (SmoothQuant on SmolLM2, ppl x2.9; SpinQuant on both)
# >= 0.795 per task and >= 0.87 on the mean, while OmniQuant's broken W4A8 (ppl x29 and x124) falls
# to 0.61 / 0.54 per task and 0.74 / 0.68 on the mean. The floors sit below the working cells and
# above the broken ones.
TASK_FLOORS: dict[str, dict[str, float]] = {
    "w8": {"task": 0.95, "mean": 0.97},
    "w4": {"task": 0.75, "mean": 0.82},
}


def task_floors(cell: Cell) -> dict[str, float]:
    return TASK_FLOORS["w8" if cell.cfg.w_bits >= 8 else "w4"]


def task_metrics(float_res: dict, cell_res: dict, tasks) -> dict:
    """Per-task and mean (equal task weights) paired recovery of acc_norm, the agreement of the
    chosen answer with the float model's, and the mean |loglikelihood change| per choice."""
    from slmquant.scores import paired_recovery, pooled_recovery
    per, agree, dll, n = {}, 0, 0.0, 0
    for t in tasks:
        f, q = float_res[t], cell_res[t]
        assert f["doc_ids"] == q["doc_ids"], f"{t}: the cell and the float model scored different items"
        per[t] = paired_recovery(f["correct_norm"], q["correct_norm"])
        for a, b in zip(f["lls"], q["lls"]):
            agree += _argmax(a) == _argmax(b)
            dll += sum(abs(x - y) for x, y in zip(a, b)) / len(a)
            n += 1
    mean = pooled_recovery(list(per.values()))
    return {"tasks": {t: r.to_dict() for t, r in per.items()}, "mean": mean.to_dict(),
            "agreement": agree / n, "mean_abs_dll": dll / n}


def _argmax(lls) -> int:
    return max(range(len(lls)), key=lls.__getitem__)


def check_tasks(cell: Cell, metrics: dict, floors: dict) -> list[str]:
    """The task gates a cell fails: recovery floors (on the upper confidence bound), and a flag when
    the cell is confidently better than float (lower bound above 1) or changed nothing at all."""
    out = []
    for name, r in [*metrics["tasks"].items(), ("mean", metrics["mean"])]:
        floor = floors["mean" if name == "mean" else "task"]
        if r["upper"] < floor:
            out.append(f"{cell.id}: {name} recovery {r['recovery']:.3f} (upper bound {r['upper']:.3f}, "
                       f"{r['n']} items) < floor {floor}")
        if r["lower"] > 1.0:
            out.append(f"{cell.id}: {name} recovery {r['recovery']:.3f} with lower bound {r['lower']:.3f} > 1: "
                       "confidently better than float, suspicious")
    if metrics["mean_abs_dll"] == 0.0:
        out.append(f"{cell.id}: no loglikelihood changed: the quantizer did not run")
    if "min_agreement" in floors and metrics["agreement"] < floors["min_agreement"]:
        out.append(f"{cell.id}: answer agreement with float {metrics['agreement']:.3f} < {floors['min_agreement']}")
    if "max_abs_dll" in floors and metrics["mean_abs_dll"] > floors["max_abs_dll"]:
        out.append(f"{cell.id}: mean |loglikelihood change| {metrics['mean_abs_dll']:.4f} > {floors['max_abs_dll']}")
    return out
