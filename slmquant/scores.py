"""The benchmark's three scores (PROTOCOL.md sections 4-6), each a root mean square of ratios to
the float model (or to the costliest method), times 100: 100 means "as good as the reference".

- slmq_perf: accuracy ratios A_quant / A_float and, for perplexity, the inverted PPL_float / PPL_quant
  (so that higher is better), over the six track-1 datasets.
- slmq_infer: memory m = mem_float / mem_quant, speed t = tps_quant / tps_float, size
  s = size_float / size_quant. The published table used the MACs ratio macs_float / macs_quant for t
  (it printed no tokens/s): both variants exist, named apart.
- slmq_quant: T_max / T and M_max / M, the largest quantization time and peak memory over the methods
  that quantized the same model.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import SlmquantError

# The six datasets of slmq_perf; "wiki" (WikiText-2 perplexity) is the one where lower is better.
PERF_DATASETS = ("mmlu", "arc_c", "arc_e", "piqa", "hellaswag", "wiki")
LOWER_IS_BETTER = frozenset({"wiki"})


def _rms100(ratios: list[float]) -> float:
    return 100 * math.sqrt(sum(r * r for r in ratios) / len(ratios))


def perf_ratios(quant: Mapping[str, float], float_: Mapping[str, float],
                datasets: tuple[str, ...] = PERF_DATASETS) -> dict[str, float]:
    """Per-dataset ratio to float, oriented so that 1 is parity and higher is better."""
    missing = [d for d in datasets if d not in quant or d not in float_]
    if missing:
        raise SlmquantError(f"slmq_perf needs {', '.join(datasets)}; missing {', '.join(missing)}")
    out = {}
    for d in datasets:
        q, f = float(quant[d]), float(float_[d])
        if q <= 0 or f <= 0:
            raise SlmquantError(f"slmq_perf: {d} must be positive (quant {q}, float {f})")
        out[d] = f / q if d in LOWER_IS_BETTER else q / f
    return out


def slmq_perf(quant: Mapping[str, float], float_: Mapping[str, float],
              datasets: tuple[str, ...] = PERF_DATASETS, cap: bool = False) -> float:
    """100 * sqrt(mean r_i^2). cap: clip at 100, as the published Table 1 appears to (one printed 100.0
    where the formula gives 100.35); off by default, so that a cell beating float shows it."""
    score = _rms100(list(perf_ratios(quant, float_, datasets).values()))
    return min(score, 100.0) if cap else score


def slmq_infer(mem: tuple[float, float], speed: tuple[float, float], size: tuple[float, float]) -> float:
    """Each argument (float, quant). mem and size: lower is better (ratio float / quant); speed: tokens/s,
    higher is better (ratio quant / float). For the published variant pass MACs as
    speed=(macs_quant, macs_float), or call slmq_infer_macs."""
    for name, pair in (("mem", mem), ("speed", speed), ("size", size)):
        if min(pair) <= 0:
            raise SlmquantError(f"slmq_infer: {name} values must be positive, got {pair}")
    m, t, s = mem[0] / mem[1], speed[1] / speed[0], size[0] / size[1]
    return _rms100([m, t, s])


def slmq_infer_macs(mem: tuple[float, float], macs: tuple[float, float], size: tuple[float, float]) -> float:
    """The published Table 3 variant: t = macs_float / macs_quant."""
    return slmq_infer(mem, (macs[1], macs[0]), size)


def slmq_quant(costs: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """costs: method -> (wall time, peak memory), every method that quantized one model (same units
    throughout). Returns method -> score; the costliest method in both scores 100."""
    if not costs:
        raise SlmquantError("slmq_quant needs the costs of at least one method")
    if any(min(c) <= 0 for c in costs.values()):
        raise SlmquantError(f"slmq_quant: times and memories must be positive, got {dict(costs)}")
    t_max = max(t for t, _ in costs.values())
    m_max = max(m for _, m in costs.values())
    return {k: _rms100([t_max / t, m_max / m]) for k, (t, m) in costs.items()}


def paper_tables(path: str | os.PathLike | None = None) -> dict:
    """The published numbers (SLMQuant paper, Tables 1-4) as kept in
    ../shared/reference/slmquant_paper_tables.json, or $SLMQUANT_REFERENCE (a folder)."""
    if path is None:
        folder = os.environ.get("SLMQUANT_REFERENCE")
        folder = Path(folder) if folder else Path(__file__).resolve().parents[2] / "shared" / "reference"
        path = folder / "slmquant_paper_tables.json"
    path = Path(path)
    if not path.is_file():
        raise SlmquantError(f"paper tables not found at {path}: set SLMQUANT_REFERENCE to the folder "
                            "holding slmquant_paper_tables.json")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class Recovery:
    """A cell's accuracy against the float model's on the same items (paired)."""
    n: int
    acc_float: float
    acc_quant: float
    se_diff: float            # standard error of the mean per-item difference (quant - float)
    z: float

    @property
    def recovery(self) -> float:
        return self.acc_quant / self.acc_float if self.acc_float else float("nan")

    @property
    def upper(self) -> float:
        """Upper confidence bound of the recovery: a cell fails a floor only when even this is below it."""
        return (self.acc_quant + self.z * self.se_diff) / self.acc_float if self.acc_float else float("inf")

    @property
    def lower(self) -> float:
        return (self.acc_quant - self.z * self.se_diff) / self.acc_float if self.acc_float else float("-inf")

    def to_dict(self) -> dict:
        return {"n": self.n, "acc_float": self.acc_float, "acc_quant": self.acc_quant,
                "recovery": self.recovery, "lower": self.lower, "upper": self.upper, "z": self.z}


def paired_recovery(float_correct: Sequence[int], quant_correct: Sequence[int], z: float = 2.576) -> Recovery:
    """Recovery A_quant / A_float on the same n items, with the paired standard error of the
    per-item difference d_i = q_i - f_i (items both models get right or wrong cancel, so the bound is
    much tighter than two independent binomials): se = sd(d) / sqrt(n)."""
    n = len(float_correct)
    if n == 0 or len(quant_correct) != n:
        raise SlmquantError(f"paired_recovery needs the same non-empty items, got {n} and {len(quant_correct)}")
    d = [int(q) - int(f) for f, q in zip(float_correct, quant_correct)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    return Recovery(n, sum(map(int, float_correct)) / n, sum(map(int, quant_correct)) / n,
                    math.sqrt(var / n), z)


def pooled_recovery(parts: Sequence[Recovery], z: float = 2.576) -> Recovery:
    """The mean over tasks (each task weighted equally, as in slmq_perf) of float and quant accuracy,
    with the standard errors combined as independent: se = sqrt(sum se_k^2) / K."""
    if not parts:
        raise SlmquantError("pooled_recovery needs at least one task")
    k = len(parts)
    return Recovery(sum(p.n for p in parts), sum(p.acc_float for p in parts) / k,
                    sum(p.acc_quant for p in parts) / k, math.sqrt(sum(p.se_diff ** 2 for p in parts)) / k, z)
