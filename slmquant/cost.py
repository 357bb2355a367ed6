"""Track 3: what quantizing costs. measure(fn) runs fn and records its wall time and peak memory.

Peak memory is the build's own, whatever else the process holds (other models of a test worker):
the bytes of the model it starts from plus the growth of the peak during the call. Counters: on
CUDA, torch.cuda.max_memory_allocated after a reset (it counts tensors only: no base to add). On
Linux, the peak resident set (VmHWM in /proc/self/status), reset before the call by writing 5 to
/proc/self/clear_refs, minus the resident set before it. Elsewhere (macOS, or where that reset is
refused), a thread samples the resident set (psutil) every few milliseconds during the call."""
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


class PeakMemory:
    """with PeakMemory(device) as p: ...; then p.growth (bytes above the start) and p.counter."""

    def __init__(self, device: str = "cpu", interval_s: float = 0.005):
        self.device, self.interval_s = device, interval_s
        self.growth, self.counter, self._thread = 0, "", None

    def __enter__(self):
        gc.collect()                              # garbage freed mid-call would lower the peak's growth
        if not self.device.startswith("cuda"):
            _release_free_memory()
        # the start: on CUDA what is allocated (models resident before the call are not its growth)
        self.base = torch.cuda.memory_allocated(torch.device(self.device)) if self.device.startswith("cuda") else rss()
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
            peak = read_peak(self.device)
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
