"""Snapshot baselines with tolerances: syrupy compares exactly by default, so this extension rounds
floats when it writes and compares each numeric leaf with a per-metric tolerance kept here, in
code, not in the snapshot files. Files: baselines/<device>/<track>/<test>/<cell id>.json.

On a CPU, <device> is "cpu" (recorded on an AVX2 machine) unless a cell has a recording for the
running instruction set, baselines/cpu-<isa>/... (e.g. cpu-avx512): GPTQ's rounding decisions are
chaotic, so a different float summation order (AVX2 vs AVX-512 kernels) moves a GPTQ cell's
perplexity by up to 6% (and a 4-bit SmoothQuant cell's by 1.4%), more than a tolerance that still
catches a regression. Only cells that differ get a per-ISA file;
`SLMQUANT_BASELINE_DEVICE=cpu-avx512 pytest -k CELL --snapshot-update` records one there."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from syrupy.extensions.json import JSONSnapshotExtension

ROOT = Path(__file__).resolve().parents[1]
SIG_DIGITS = 4
# (kind, tolerance) per metric name; a numeric leaf not listed must match to REL_DEFAULT.
TOL: dict[str, tuple[str, float]] = {
    "ppl": ("rel", 0.01),             # perplexity of a cell: 1% (summation order across CPUs)
    "ppl_ratio": ("rel", 0.01),       # quantized / float perplexity of the same run
    "sqnr_db": ("abs", 0.5),          # logit SQNR against float, dB
    "kl": ("rel", 0.10),              # mean KL(float || quantized) per position
    "acc": ("abs", 0.01),
    "acc_norm": ("abs", 0.025),       # task accuracy on a sample: 3 of 120 items may flip
    "recovery": ("abs", 0.02),        # mean task accuracy of a cell / of float on the same items
    "agreement": ("abs", 0.05),       # answers agreeing with float's (tiny tier: 1 of 20 items)
    "mean_abs_dll": ("rel", 0.10),    # mean |loglikelihood change| per choice against float
    "speedup": ("rel", 0.25),
    "prefill_speedup": ("rel", 0.25), # real / float tokens/s measured side by side in one test
    "decode_speedup": ("rel", 0.25),
    "memory_ratio": ("rel", 0.05),    # real / float peak memory (model tensors + RSS growth)
    "time_ratio": ("rel", 0.35),      # quantization wall time / float forward time on its calibration
    "mem_ratio": ("rel", 0.10),       # quantization peak memory / float model bytes
}
REL_DEFAULT = 1e-3


def device_class() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().lower().replace(" ", "-")
    return "cpu"


def isa_class() -> str | None:
    """The per-instruction-set baseline folder of this CPU (None on a GPU)."""
    if torch.cuda.is_available():
        return None
    return "cpu-" + torch.backends.cpu.get_cpu_capability().lower()


def _cell_name(test_location) -> str:
    name = test_location.nodename or test_location.methodname
    return name[name.index("[") + 1:-1] if "[" in name else "default"


def _round(x):
    if isinstance(x, float):
        return float(f"{x:.{SIG_DIGITS}g}") if math.isfinite(x) else x
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v) for v in x]
    return x


def compare(actual, expected, path: str = "") -> list[str]:
    """Differences between two JSON documents beyond the tolerances: [] when they match."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = [f"{path}/{k}: missing (baseline has {expected[k]!r})" for k in expected if k not in actual]
        out += [f"{path}/{k}: new key (not in the baseline)" for k in actual if k not in expected]
        for k in expected.keys() & actual.keys():
            out += compare(actual[k], expected[k], f"{path}/{k}")
        return out
    num = (int, float)
    if isinstance(expected, num) and isinstance(actual, num) and not isinstance(expected, bool):
        kind, tol = TOL.get(path.rsplit("/", 1)[-1], ("rel", REL_DEFAULT))
        diff = abs(actual - expected)
        bound = tol if kind == "abs" else tol * abs(expected)
        return [] if diff <= bound else [f"{path}: {actual} vs baseline {expected} (tolerance {kind} {tol})"]
    return [] if actual == expected else [f"{path}: {actual!r} vs baseline {expected!r}"]


class BaselineExtension(JSONSnapshotExtension):
    @classmethod
    def dirname(cls, *, test_location) -> str:
        track = next((p.split("_")[0] for p in Path(test_location.filepath).parts if p.startswith("track")), "core")
        base, rel = ROOT / "baselines", Path(track) / test_location.methodname
        device = os.environ.get("SLMQUANT_BASELINE_DEVICE")
        if not device:
            isa = isa_class()
            own = isa and (base / isa / rel / f"{_cell_name(test_location)}.json").exists()
            device = isa if own else device_class()
        return str(base / device / rel)

    @classmethod
    def get_snapshot_name(cls, *, test_location, index=0) -> str:
        cell = _cell_name(test_location)
        return cell if not index else f"{cell}.{index}"

    @classmethod
    def matches_test_location(cls, *, test_location, snapshot_location: str) -> bool:
        return Path(snapshot_location).parent == Path(cls.dirname(test_location=test_location))

    def serialize(self, data, **kwargs):
        return super().serialize(_round(data), **kwargs)

    def matches(self, *, serialized_data, snapshot_data) -> bool:
        try:
            return not compare(json.loads(serialized_data), json.loads(snapshot_data))
        except (TypeError, ValueError):
            return serialized_data == snapshot_data
