"""Snapshot baselines with tolerances: syrupy compares exactly by default, so this extension rounds
floats when it writes and compares each numeric leaf with a per-metric tolerance kept here, in
code, not in the snapshot files. Files: baselines/<device class>/<track>/<test>/<cell id>.json.

The device class is "cpu" on any CPU (x86 of either instruction set, ARM, Apple) and the GPU's name
on CUDA (`SLMQUANT_BASELINE_DEVICE` overrides it): accuracy is gated on statistics whose spread
across instruction sets, thread counts and calibration draws was measured (tests/spread.py), with
per-cell bands (tests/gates.py), so one CPU baseline serves every CPU. Speed ratios differ by design
between integer kernel paths and are keyed by the path the cell ran (track 2)."""
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


def worker_device(worker: str | None, n_gpus: int) -> str:
    """The device of an xdist worker: `cpu` without a GPU, else one GPU per worker (`gw0` -> cuda:0,
    `gw1` -> cuda:1, ..., wrapping around when there are more workers than GPUs)."""
    if n_gpus < 1:
        return "cpu"
    idx = int(worker[2:]) if worker and worker.startswith("gw") and worker[2:].isdigit() else 0
    return f"cuda:{idx % n_gpus}"


def device_class() -> str:
    override = os.environ.get("SLMQUANT_BASELINE_DEVICE")
    if override:
        return override
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().lower().replace(" ", "-")
    return "cpu"


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


def compare(actual, expected, path: str = "", tols: dict | None = None) -> list[str]:
    """Differences between two JSON documents beyond the tolerances (TOL, or `tol`): [] when they match."""
    tols = TOL if tols is None else tols
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = [f"{path}/{k}: missing (baseline has {expected[k]!r})" for k in expected if k not in actual]
        out += [f"{path}/{k}: new key (not in the baseline)" for k in actual if k not in expected]
        for k in expected.keys() & actual.keys():
            out += compare(actual[k], expected[k], f"{path}/{k}", tols)
        return out
    num = (int, float)
    if isinstance(expected, num) and isinstance(actual, num) and not isinstance(expected, bool):
        # the nearest named component with a tolerance: /acc_norm/arc_easy takes acc_norm's
        kind, tol = next((tols[k] for k in reversed(path.split("/")) if k in tols), ("rel", REL_DEFAULT))
        diff = abs(actual - expected)
        bound = tol if kind == "abs" else tol * abs(expected)
        return [] if diff <= bound else [f"{path}: {actual} vs baseline {expected} (tolerance {kind} {tol})"]
    return [] if actual == expected else [f"{path}: {actual!r} vs baseline {expected!r}"]


class BaselineExtension(JSONSnapshotExtension):
    tol: dict[str, tuple[str, float]] = TOL

    @classmethod
    def with_bands(cls, bands: dict[str, float]) -> type["BaselineExtension"]:
        """This extension with relative bands for some metrics (a cell's measured bands)."""
        return type("BandedBaseline", (cls,), {"tol": {**TOL, **{k: ("rel", v) for k, v in bands.items()}}})

    subdir = ""

    @classmethod
    def with_subdir(cls, subdir: str) -> type["BaselineExtension"]:
        """This extension reading and writing one folder deeper (track 2: the kernel path)."""
        return type("SubdirBaseline", (cls,), {"subdir": subdir})

    @classmethod
    def dirname(cls, *, test_location) -> str:
        track = next((p.split("_")[0] for p in Path(test_location.filepath).parts if p.startswith("track")), "core")
        return str(ROOT / "baselines" / device_class() / track / test_location.methodname / cls.subdir)

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
            return not compare(json.loads(serialized_data), json.loads(snapshot_data), tols=self.tol)
        except (TypeError, ValueError):
            return serialized_data == snapshot_data


def recorded(snapshot) -> dict | None:
    """The baseline document a syrupy assertion would compare with (None: not recorded)."""
    ext, loc = snapshot.extension, snapshot.test_location
    path = Path(ext.dirname(test_location=loc)) / f"{ext.get_snapshot_name(test_location=loc)}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load(track: str, test: str, name: str) -> dict | None:
    """A recorded baseline document of this device class by test and cell name (None: absent)."""
    try:
        return json.loads((ROOT / "baselines" / device_class() / track / test / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
