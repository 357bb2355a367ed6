"""Profiles: `quick` (the default on a CPU) shrinks calibration so a cell finishes in minutes on two
cores and scores WikiText-2 on the first 40 windows; `paper` keeps each method's paper settings;
`smoke` calibrates as the test suite's default tier (so the two share cached cells) and scores the
first 4 windows, for a whole `slmquant run` in under half an hour on two cores."""
from __future__ import annotations

from dataclasses import fields

from .errors import SlmquantError
from .methods import get_method
from .quant import parse_bits

# Calibration budget of the quick profile, applied to the fields a method's config has: 65,536
# tokens. GPTQ keeps its paper's 128 windows and shortens them to 512 tokens instead: on SmolLM2
# 32 x 2048 closes 25% of RTN W4A16's gap to float, 128 x 512 54% (docs/track1_measurements.md,
# "GPTQ and the length of its calibration windows"): every window restarts at position 0, and the
# first positions of a window, whose keys and values every later token reads, are 1/2048 of the
# Hessian's tokens at 2048.
QUICK = {"calib_samples": 32, "calib_seqlen": 2048}
# OmniQuant trains every block on every window for `epochs` passes (the paper: 128 x 2048, 20 epochs,
# hours on a CPU): 64 windows of 512 tokens, 2 epochs (128 steps a block, the reference's 2,560), sized
# for a SmolLM2 cell in about 13 min and a Qwen2.5-0.5B cell in about 40 on two cores. With 20 times
# fewer AdamW steps, the learning rates are raised (LWC 1e-2 -> 0.1, LET 5e-3 -> 0.02): chosen on
# held-out windows (16 x 512 from token 81,920), where they cut SmolLM2 W4A8's KL from float by 28%
# at this budget (docs/omniquant.md, "Quick-profile learning rates").
# SpinQuant learns its rotations for 50 Cayley steps of one 512-token window each (the reference: 100
# steps of 8 windows of 2048 tokens) and rounds with GPTQ on GPTQ's quick calibration: about 10-20 s a
# SmolLM2 step measured with another job on the cores, so a SmolLM2 cell in about 15 min (an estimate,
# not yet timed on a whole build; docs/spinquant.md).
QUICK_BY_METHOD = {"gptq": {"calib_samples": 128, "calib_seqlen": 512},
                   "omniquant": {"calib_samples": 64, "calib_seqlen": 512, "epochs": 2, "lwc_lr": 0.1, "let_lr": 0.02},
                   "spinquant": {"calib_samples": 128, "calib_seqlen": 512, "steps": 50}}
# Settings of one (method, bits) on the quick profile, over QUICK_BY_METHOD's. OmniQuant W4A8 and
# W8A8 add a LET pair up_proj -> down_proj (exact; not in the reference), where SmolLM2's massive
# activations enter the residual stream: at this budget it cut SmolLM2 W4A8's held-out KL from float
# by 21% (windows from token 81,920); on the judged first 40 windows of 2048 it took SmolLM2 from
# x1.404 to x1.310 of float and Qwen2.5-0.5B from x1.163 to x1.157 (docs/omniquant.md, "let_down on
# the judged windows"). At W8A8 it cut SmolLM2's held-out KL by 41% (0.0160 -> 0.0095, the same
# windows) and on the judged windows took SmolLM2 from x1.0101 to x1.0065 and Qwen2.5-0.5B from
# x1.0062 to x1.0038 (docs/omniquant.md, "let_down at W8A8"). OmniQuant W4A8 also rounds with GPTQ
# (`weights="gptq"`: after each block's training, the folded float weights rounded by GPTQ on LWC's
# learned per-row grids; the reference rounds to nearest): it cut SmolLM2 W4A8's held-out KL from
# float by 30% (0.301 -> 0.212, the same windows), and on the judged windows took SmolLM2 from
# x1.310 to x1.205 and Qwen2.5-0.5B from x1.157 to x1.081 (docs/omniquant.md, "weights=gptq"). A
# hybrid, not the paper's method: the paper profile keeps the reference's rounding.
QUICK_BY_CELL = {("omniquant", (4, 8)): {"let_down": True, "weights": "gptq"},   # (method, (w, a) bits)
                 ("omniquant", (8, 8)): {"let_down": True}}
# The paper profile: each method's config defaults (the papers' and reference scripts' settings),
# and SpinQuant's 8 windows per Cayley step (the reference's 8 GPUs x 1 window; the config keeps 1,
# the budget its default-tier and quick cells were measured at).
PAPER_BY_METHOD = {"spinquant": {"batch": 8}}

# The pull-request gate (and the quick profile's default task sample): the five tasks of slmq_perf on
# a seeded sample of this many items each, sized so that one cell of the whole SmolLM2 scores all
# five in under 5 minutes on a 2-core CPU (tests/track1_accuracy/test_task_eval_benchmark.py).
PR_GATE_TASKS = ("mmlu_cloze", "arc_challenge", "arc_easy", "piqa", "hellaswag")
PR_GATE_ITEMS = 120        # 150 items measured 314 s (RTN W8A8, fresh): over the 5-minute target


# The smoke profile: 16 calibration windows of 512 tokens (8,192 tokens), OmniQuant 1 epoch,
# SpinQuant 8 Cayley steps: the default tier's budget (tests/matrix.py DEFAULT). WikiText-2 on the
# first SMOKE_WINDOWS windows of 2048 (8,188 predicted tokens); tasks and track 2 on small samples
# (slmquant/bench.py TASK_ITEMS, TRACK2). Sized so that `slmquant run --profile smoke` finishes in
# under 30 minutes on two cores from a cold cache (docs/run_timing.md); the report prints every
# score's 95% interval, which these sample sizes leave wide.
SMOKE = {"calib_samples": 16, "calib_seqlen": 512, "epochs": 1, "steps": 8}
SMOKE_WINDOWS = 4
PROFILES = ("quick", "paper", "smoke")


def profile_windows(profile: str) -> int | None:
    """WikiText-2 windows a profile scores: the first N of 2048 tokens (quick, smoke), or None: all."""
    from . import evaluate
    return {"quick": evaluate.QUICK_WINDOWS, "smoke": SMOKE_WINDOWS}.get(profile)


def profile_settings(method: str, profile: str, bits: str) -> dict:
    """The settings `profile` gives a cell of `method` at `bits`, before the user's own (`--set`)."""
    if profile not in PROFILES:
        raise SlmquantError(f"profile {profile!r}: choose {', '.join(PROFILES)}")
    if profile == "paper":
        return dict(PAPER_BY_METHOD.get(method, {}))
    names = {f.name for f in fields(get_method(method).config)}
    if profile == "smoke":
        return {k: v for k, v in SMOKE.items() if k in names}
    quick = {**QUICK, **QUICK_BY_METHOD.get(method, {}), **QUICK_BY_CELL.get((method, parse_bits(bits)), {})}
    return {k: v for k, v in quick.items() if k in names}
