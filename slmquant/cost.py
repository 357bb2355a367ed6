"""Track 3: what quantizing costs. measure(fn) runs fn and records its wall time and peak memory.

Peak memory: on CUDA, torch.cuda.max_memory_allocated after a reset. On a CPU, the process's peak
resident set (VmHWM in /proc/self/status), reset before the measurement by writing 5 to
/proc/self/clear_refs (Linux); where that reset is refused, the peak since process start is
reported and the record says so."""
from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class Cost:
    wall_s: float
    peak_mem_bytes: int
    mem_counter: str          # which counter measured the peak
    device: str

    def to_dict(self) -> dict:
        return asdict(self)


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read())[1]) * 1024


def reset_peak(device: str) -> str:
    """Reset the peak-memory counter of `device`; returns the counter's name."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return "torch.cuda.max_memory_allocated"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM (peak RSS, reset via clear_refs)"
    except OSError:
        return "VmHWM (peak RSS since process start: reset refused)"


def read_peak(device: str) -> int:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _vm_hwm()


def measure(fn, device: str = "cpu"):
    """(fn(), Cost) with the wall time and peak memory of the call."""
    counter = reset_peak(device)
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return out, Cost(wall, read_peak(device), counter, device)
