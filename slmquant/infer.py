"""Track 2: what running a model costs. Prefill and decode speed at batch 1, peak memory during
inference, storage size, and multiply-accumulates (MACs) with integer and floating-point ones apart.

Settings follow the paper: a fixed WikiText-2 input of 128 tokens, prefill timed over 100 iterations
after 10 warm-ups; decode: 128 new tokens, greedy, with the KV cache.

Peak memory. CUDA: `torch.cuda.max_memory_allocated` over the timed prefill (weights included). CPU:
the bytes of the model's tensors in memory plus the growth of the process's peak resident set
(VmHWM, reset through /proc/self/clear_refs) over the timed prefill: the weights plus the working
memory of inference, without the Python runtime every process carries.

MACs: torch's own FlopCounterMode over one prefill. It has no formula for integer matmuls
(`aten._int_mm`, oneDNN's `qlinear_pointwise`) nor for the int8 weight-only kernel
(`aten._weight_int8pack_mm`), nor for the CPU attention kernel
(`aten._scaled_dot_product_flash_attention_for_cpu`): all four are registered here, so quantized and
attention MACs are counted, not silently dropped. Integer matmuls count as integer MACs (the two-pass "u7x2" kernel does, and counts,
twice its layer's MACs), everything else as floating-point MACs."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from . import cost

PREFILL_TOKENS = 128
ITERS, WARMUP = 100, 10
DECODE_TOKENS = 128
INT_OPS = ("_int_mm", "qlinear_pointwise")


def _register_flop_formulas() -> None:
    from torch.utils.flop_counter import flop_registry, register_flop_formula
    aten = torch.ops.aten
    if aten._int_mm not in flop_registry:
        @register_flop_formula(aten._int_mm)
        def _int_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
            m, k = a_shape
            return 2 * m * k * b_shape[1]
    qlinear = torch.ops.onednn.qlinear_pointwise
    if qlinear not in flop_registry:
        @register_flop_formula(qlinear)
        def _qlinear_flop(x_shape, *args, out_shape=None, **kwargs) -> int:
            return 2 * x_shape[0] * x_shape[1] * out_shape[-1]
    if aten._scaled_dot_product_flash_attention_for_cpu not in flop_registry:
        @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
        def _sdpa_cpu_flop(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
            b, h, l, e = q_shape
            return 2 * b * h * l * k_shape[-2] * (e + v_shape[-1])      # Q K^T and P V
    if aten._weight_int8pack_mm not in flop_registry:
        @register_flop_formula(aten._weight_int8pack_mm)
        def _w8_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
            return 2 * x_shape[0] * x_shape[1] * w_shape[0]


@torch.no_grad()
def macs(model: nn.Module, ids: torch.Tensor) -> dict:
    """MACs of one forward pass over `ids`: {"int": ..., "float": ..., "total": ..., "by_op": {...}}."""
    from torch.utils.flop_counter import FlopCounterMode
    _register_flop_formulas()
    with FlopCounterMode(display=False) as counter:
        model(ids)
    by_op = {str(op).split(".")[-1] if "." in str(op) else str(op): n // 2
             for op, n in counter.get_flop_counts()["Global"].items()}
    ints = sum(n for op, n in by_op.items() if any(op.startswith(i) for i in INT_OPS))
    total = sum(by_op.values())
    return {"int": ints, "float": total - ints, "total": total, "by_op": by_op}


def fixed_input(tokenizer, n: int = PREFILL_TOKENS, root=None) -> torch.Tensor:
    """(1, n) token ids: the start of the WikiText-2 test string, the same for every model."""
    from . import data
    ids = tokenizer(data.wikitext2_text("test", root)[:20 * n], add_special_tokens=False,
                    return_tensors="pt").input_ids[:, :n]
    return ids


@dataclass
class Track2:
    device: str
    prefill_tokens: int
    prefill_tok_s: float
    decode_tokens: int
    decode_tok_s: float
    peak_mem_bytes: int
    mem_counter: str
    model_bytes: int              # tensors in memory
    macs: dict

    def to_dict(self) -> dict:
        return asdict(self)


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors in memory: parameters and buffers (tied ones once), plus what
    modules hold outside them at run time (a RealLinear's prepacked kernel weight)."""
    from .real import unique_tensors
    tensors = [*model.named_parameters(), *model.named_buffers()]
    extra = sum(m.runtime_bytes() for m in model.modules() if hasattr(m, "runtime_bytes"))
    return sum(t.numel() * t.element_size() for _, t in unique_tensors(tensors)) + extra


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def prefill_side_by_side(models: list[nn.Module], ids: torch.Tensor, iters: int = ITERS,
                         warmup: int = WARMUP, rounds: int = 10) -> list[float]:
    """Prefill tokens/s of several models, interleaved: after `warmup` passes of each, `rounds`
    rounds (at most `iters`) each time iters / rounds passes of every model in turn (the order
    alternating), so that a slow spell of a shared machine (CPU steal, another process) falls on every model alike and
    their ratio stays meaningful."""
    device = str(ids.device)
    for m in models:
        for _ in range(warmup):
            m(ids)
    rounds = max(1, min(rounds, iters))
    per = max(1, iters // rounds)
    seconds = [0.0] * len(models)
    for r in range(rounds):
        order = list(enumerate(models))
        for i, m in (order if r % 2 == 0 else order[::-1]):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(per):
                m(ids)
            _sync(device)
            seconds[i] += time.perf_counter() - t0
    return [ids.shape[1] * per * rounds / s for s in seconds]


@torch.no_grad()
def measure(model: nn.Module, ids: torch.Tensor, iters: int = ITERS, warmup: int = WARMUP,
            decode_tokens: int = DECODE_TOKENS, prefill_tok_s: float | None = None) -> Track2:
    """Track 2 of one model. prefill_tok_s: already measured (`prefill_side_by_side`); the peak
    memory is then taken over 3 prefill passes instead of the timed ones."""
    device = str(ids.device)
    for _ in range(warmup if prefill_tok_s is None else 1):
        model(ids)
    _sync(device)
    n = iters if prefill_tok_s is None else 3
    with cost.PeakMemory(device) as mem:
        t0 = time.perf_counter()
        for _ in range(n):
            model(ids)
        _sync(device)
        elapsed = time.perf_counter() - t0
    if prefill_tok_s is None:
        prefill_tok_s = ids.shape[1] * n / elapsed
    # the model's own tensors plus what the passes added, on either device: on CUDA the absolute
    # peak would also count every other model held in memory (the float model beside a cell)
    peak, counter = model_bytes(model) + mem.growth, f"model tensors + growth of the peak ({mem.counter})"
    decode_s = _decode_seconds(model, ids, decode_tokens)
    return Track2(device, ids.shape[1], prefill_tok_s, decode_tokens, decode_tokens / decode_s,
                  peak, counter, model_bytes(model), macs(model, ids))


def _decode_seconds(model: nn.Module, ids: torch.Tensor, n: int) -> float:
    """Greedy decoding of n tokens after the prompt, with the KV cache; the prompt's own forward
    pass is not timed."""
    out = model(ids, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(str(ids.device))
    t0 = time.perf_counter()
    for _ in range(n):
        out = model(nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(str(ids.device))
    return time.perf_counter() - t0
