"""Track 3: what quantizing costs. measure(fn) runs fn and records its wall time and peak memory.

Peak memory is the build's own, whatever else the process holds (other models of a test worker):
the bytes of the model it starts from plus the growth of the peak during the call. Counters: on
CUDA, torch.cuda.max_memory_allocated after a reset (it counts tensors only: no base to add). On
Linux, the peak resident set (VmHWM in /proc/self/status), reset before the call by writing 5 to
/proc/self/clear_refs, minus the resident set before it. Elsewhere (macOS, or where that reset is
refused), a thread samples the resident set (psutil) every few milliseconds during the call.
Measurements nest: an inner one resets the shared counter only after carrying its reading over to
the measurements around it, so the outer peak still covers the inner call.
A build that reuses a shared computation from a cache (SpinQuant's rotations, learned once for W8A8
and W4A8) is charged that computation's recorded cost (`charge_shared`), so a cell's cost does not
depend on which cell happened to be built first."""
from __future__ import annotations

import gc
import re
import threading
import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class Cost:
    wall_s: float
    peak_mem_bytes: int
    mem_counter: str          # which counter measured the peak
    device: str
    shared_s: float = 0.0     # of wall_s: a shared computation's recorded time, read from a cache


    def to_dict(self) -> dict:
        return asdict(self)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read())[1]) * 1024


def rss() -> int:
    """The process's resident set now, in bytes (any OS)."""
    try:
        return _status("VmRSS")
    except OSError:
        import psutil
        return psutil.Process().memory_info().rss


def reset_peak(device: str) -> str:
    """Reset the peak-memory counter of `device`; returns the counter's name, or "" where no
    counter can be reset (then use PeakMemory, which samples)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return "torch.cuda.max_memory_allocated"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM (peak RSS, reset via clear_refs)"
    except OSError:
        return ""


def read_peak(device: str) -> int:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status("VmHWM")


def _release_free_memory() -> None:
    """Give the C allocator's free pages back to the OS (glibc's malloc_trim), so that the resident
    set before a measurement is what is in use: otherwise a call that reuses freed but resident
    memory (an earlier model's) grows no peak and its memory goes uncounted. Garbage is collected
    first (PeakMemory), for the same reason: an earlier model in a reference cycle freed during the
    call would lower the resident set under the call's own growth."""
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass                                      # not glibc (macOS): the sampled RSS is what it is


_ACTIVE: list[PeakMemory] = []          # the measurements in progress, outermost first


class PeakMemory:
    """with PeakMemory(device) as p: ...; then p.growth (bytes above the start) and p.counter."""

    def __init__(self, device: str = "cpu", interval_s: float = 0.005):
        self.device, self.interval_s = device, interval_s
        self.growth, self.counter, self._thread, self._carry = 0, "", None, 0

    def __enter__(self):
        gc.collect()                              # garbage freed mid-call would lower the peak's growth
        if not self.device.startswith("cuda"):
            _release_free_memory()
        # the start: on CUDA what is allocated (models resident before the call are not its growth)
        self.base = torch.cuda.memory_allocated(torch.device(self.device)) if self.device.startswith("cuda") else rss()
        for outer in _ACTIVE:                     # the reset below must not lose their peak so far
            if outer._thread is None and outer.device == self.device:
                outer._carry = max(outer._carry, read_peak(self.device))
        _ACTIVE.append(self)
        self.counter = reset_peak(self.device)
        if not self.counter:                      # no resettable counter: sample the resident set
            self.counter, self._max, self._stop = "sampled RSS (psutil)", self.base, threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._max = max(self._max, rss())
            time.sleep(self.interval_s)

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = max(self._max, rss())
        else:
            peak = max(read_peak(self.device), self._carry)
        _ACTIVE.remove(self)
        self.growth = max(0, peak - self.base)
        return False


def measure(fn, device: str = "cpu", base_bytes: int = 0):
    """(fn(), Cost) with the wall time and the peak memory of the call: base_bytes (the model it
    starts from) plus the growth of the peak during the call."""
    with PeakMemory(device) as p:
        t0 = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    return out, Cost(wall, base_bytes + p.growth, f"model bytes + growth of the peak ({p.counter})", device)


def charge_shared(c: Cost, shared: dict | None, base_bytes: int) -> Cost:
    """c with a shared computation's cost added where the build read it from a cache instead of
    computing it: shared = {"from_cache": bool, "wall_s": s, "peak_growth_bytes": b} (as a method
    records it in its method_info["shared_cost"]); its peak counts on top of the model's bytes."""
    if not shared or not shared.get("from_cache"):
        return c
    return Cost(c.wall_s + shared["wall_s"], max(c.peak_mem_bytes, base_bytes + shared["peak_growth_bytes"]),
                c.mem_counter, c.device, shared_s=shared["wall_s"])
