"""The matrix of cells, defined once: models x methods x (bits, settings), each a pytest.param with
its markers. Methods contribute their own (bits, settings) rows through the registry's `suite`."""
from __future__ import annotations

from dataclasses import dataclass, fields

import pytest

from slmquant.cells import SHORT_NAMES, Cell
from slmquant.methods import CalibConfig, all_methods, make_config
from slmquant.profiles import profile_settings


@dataclass(frozen=True)
class Tier:
    name: str
    models: tuple[str, ...]
    seqlen: int               # WikiText-2 scoring windows: the first `windows` windows of `seqlen`
    windows: int
    calib: tuple[tuple[str, int], ...] | None   # calibration budget; None: the quick profile's, per method
    logits: bool              # also gate the logit error (SQNR, KL) against float
    marks: tuple = ()
    exclude: tuple = ()       # (method, bits, settings) suite rows this tier leaves to the slow tier
    slow: tuple = ()          # rows this tier runs only with --runslow (their baselines kept current)
    groups: bool = True       # False: leave out every suite row with a group_size


# Default tier: the whole bundled SmolLM2 gated on 16 x 512 tokens (tests/gates.py), small calibration.
# Every method at W8A8 and W4A8 (the paper's matrix) and W4A16 where a mutation needs it (RTN, GPTQ);
# costly setting variants run only in the slow tier, to keep the default run under 30
# minutes on two cores from a cold cache: GPTQ sym=False, SmoothQuant's alpha search (with RTN and
# GPTQ weights), SpinQuant's no-learning control, and, moved there on 2026-12-02 (a cold run took
# 36 min of pytest with them; each cost 200-250 s of one worker): GPTQ W4A16 with groups of 64,
# SmoothQuant W8A8's alpha search, OmniQuant W4A16 (weight-only LWC, outside the paper's matrix),
# and on the same grounds SpinQuant W4A16 on 2026-12-02 (its own rotations learned against 4-bit
# RTN weights, then GPTQ: about 290 s of one worker; its GPTQ-replaced-by-RTN mutation now at W4A8),
# with RTN W4A16 asymmetric, whose place here was to be the damage-ratio twin of those W4A16 cells
# (asymmetric weights stay gated through RTN W4A8 asymmetric, OmniQuant's and SpinQuant's twin).
# On 2026-12-02 (a cold `.ci/run` took 34 min 44 s, its pytest 33 min 27 s): GPTQ W8A8 (250 s of
# one worker, the gate cell with its scoring; GPTQ is gated at W4A8 and W4A16),
# and RTN W4A16 with groups of 64 (53 s; no default cell has it as its RTN twin any more, and group
# quantization stays tested on tiny models: tests/core/test_cache.py, tests/track2_inference).
# Later on 2026-12-02 (a cold `.ci/run` took 34 min 2 s on another VM, its pytest 32 min 39 s): OmniQuant
# W8A8 and SpinQuant W8A8 (342 s and 353 s of one worker, the two costliest gate cells, each its
# build, its scoring and the asymmetric RTN W8A8 twin's). What stays in CI for them: the same methods'
# W4A8 cells and mutations (the same code but the weights' bit width), every suite row on a tiny
# llama (tests/track1_accuracy/test_task_cells.py, which also runs GPTQ's 8-bit weights), and
# SmoothQuant and RTN at W8A8 on the whole model.
# These four stay default-tier cells marked slow (`slow` below): `--runslow` gates them and
# `--runslow -k test_cell_gate --snapshot-update` keeps their baselines current (GPTQ W8A8's slow
# mutation is judged against its baseline). Their measured spreads stay in tests/gates.py SPREAD.
# OmniQuant trains one epoch over the 16 windows (about 100 s a cell): on held-out windows its W4A8
# damage is 0.72 of RTN's, against 0.84 with no training (docs/omniquant.md).
# SpinQuant learns its rotations for 8 Cayley steps (one 512-token window each, about 4 s a step):
# on held-out windows its rotations halve GPTQ's W4A8 damage, but 8-16 learned steps do no better
# than the random Hadamards they start from (docs/spinquant.md): the gate sees the rotations'
# benefit, not the learning's; the control without learning is left to the slow tier.
DEFAULT = Tier("default", ("smollm2-135m",), 512, 16,
               (("calib_samples", 16), ("calib_seqlen", 512), ("epochs", 1), ("steps", 8)), True,
               exclude=(("gptq", "w4a8", {"sym": False}), ("gptq", "w4a16", {"sym": False}),
                        ("gptq", "w4a16", {"group_size": 64}), ("omniquant", "w4a16", {}),
                        ("smoothquant", "w8a8", {"alpha_search": True}),
                        ("smoothquant", "w4a8", {"alpha_search": True}),
                        ("smoothquant", "w4a8", {"alpha_search": True, "weights": "gptq"}),
                        ("spinquant", "w4a8", {"learn": False}), ("spinquant", "w4a16", {}),
                        ("rtn", "w4a16", {"sym": False})),
               slow=(("gptq", "w8a8", {}), ("rtn", "w4a16", {"group_size": 64}),
                     ("omniquant", "w8a8", {}), ("spinquant", "w8a8", {})))
# Short windows for checks that hold several models' logits at once (track 2: real against fake).
SHORT = Tier("short", DEFAULT.models, 256, 4, DEFAULT.calib, True)
# Track 1 tasks on tiny random models (default tier): every suite row quantizes a 2-layer llama in
# about a second; the group-64 rows do not divide its 160-wide MLP and run on the real models only.
TINY = Tier("tiny", ("tiny:llama",), 128, 2, (("calib_samples", 4), ("calib_seqlen", 128), ("steps", 4)), False,
            groups=False)
# Slow tier: both bundled models on the quick profile's fixed subset (first 40 windows of 2048),
# calibrated on the quick profile's budget (slmquant.profiles: GPTQ 128 x 512, the others 32 x 2048).
QUICK = Tier("quick", ("smollm2-135m", "qwen2.5-0.5b"), 2048, 40, None, False, (pytest.mark.slow,))


def make_cell(model: str, method: str, bits: str, settings: dict, tier: Tier) -> Cell:
    cls = all_methods()[method].config
    over = dict(settings)
    if tier.calib is None:
        over = {**profile_settings(method, "quick", bits), **over}
    elif issubclass(cls, CalibConfig):
        names = {f.name for f in fields(cls)}
        over = {**{k: v for k, v in tier.calib if k in names}, **over}
    return Cell(model, method, make_config(method, bits, over))


def cases(tier: Tier) -> list:
    out = []
    for model in tier.models:
        for name, method in all_methods().items():
            for bits, settings in method.suite:
                if (name, bits, settings) in tier.exclude or (not tier.groups and "group_size" in settings):
                    continue
                cell = make_cell(model, name, bits, settings, tier)
                # one xdist group per cell (run with --dist loadgroup, pytest.ini): every test of a
                # cell runs on the worker that builds it, instead of a second worker waiting on the
                # cell's build lock (up to 3 minutes each at OmniQuant's cells, measured)
                marks = [getattr(pytest.mark, bits), getattr(pytest.mark, name),
                         getattr(pytest.mark, SHORT_NAMES.get(model, "tiny")), *tier.marks,
                         pytest.mark.xdist_group(cell.id)] + [pytest.mark.slow] * ((name, bits, settings) in tier.slow)
                out.append(pytest.param(cell, marks=marks, id=cell.id))
    return out
