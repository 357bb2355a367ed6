"""Track 2 for every cell of the matrix: the cell as a real low-bit model (integer weights, integer
kernels).

Default tier (whole SmolLM2, every default cell): storage against the float16 checkpoint within the
issue's ceilings (tied weights once), and the real model computes what its fake-quantized cell
computes (see test_real_cell_storage_and_numerics for how closely that can be asked).
Slow tier, accuracy: the real RTN W8A8 model's quick-profile perplexity within 0.5% of the
fake-quantized cell's.

Slow tier (both bundled models, every quick cell): speed and memory of the real model against the
float model measured in the same test, on the protocol's fixed 128-token input (prefill timed
interleaved with the float model's). The ratios are kept
in the snapshot band (speed: +-25%, for a noisy shared machine) and the memory ratio is gated;
pytest-benchmark records the real model's prefill latency. Raw times are never compared across
machines."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from slmquant import evaluate, infer
from slmquant.real import int8_embeddings_, kernel_paths, storage, to_real
from tests import gates
from tests.baseline import BaselineExtension
from tests.matrix import DEFAULT, QUICK, SHORT, cases

# Storage of the real model / the float16 checkpoint, tied weights once (issue 6). Per-channel grids;
# group grids add a float32 scale and an int16 zero point per group of `group_size` weights.
STORAGE_CEILING = {("float16", 8): 0.62, ("float16", 4): 0.42, ("int8", 8): 0.52, ("int8", 4): 0.31}
REAL_PPL_RTOL = 0.005
UNTIES = {"spinquant"}        # methods that untie a tied LM head (R1 rotates the embeddings only)
# KL(fake || real) over KL(float || fake) for A8 cells on the default tier: measured 0.89-1.14 at
# W8A8 (RTN 1.03, GPTQ 1.14, SmoothQuant 0.89) and 0.064 at W4A8 (RTN); a broken kernel (wrong scale,
# saturating sums) measures orders of magnitude more.
A8_KL_RATIO = 1.5


def _ceiling(cell, embeddings: str, fmodel, real) -> float:
    """The ceiling for the cell's bits, plus what the cell stores beyond its weights' grid: a scale
    and zero point per group, and an LM head the method untied from the embeddings (SpinQuant's R1:
    stored in the embeddings' format, float16 or int8, and counted in full)."""
    c = STORAGE_CEILING[(embeddings, cell.cfg.w_bits)]
    fbytes = storage(fmodel)["bytes"]
    g = cell.cfg.group_size
    if g:
        linear = sum(m.weight.numel() for n, m in fmodel.named_modules()
                     if n.startswith("model.layers") and isinstance(m, torch.nn.Linear))
        c += linear * 6 / g / fbytes
    # only for a method that unties by design: another method's untied head gets no allowance
    if cell.method in UNTIES and fmodel.config.tie_word_embeddings and not real.config.tie_word_embeddings:
        c += fmodel.get_output_embeddings().weight.numel() * (2 if embeddings == "float16" else 1) / fbytes
    return c


@pytest.mark.parametrize("cell", cases(DEFAULT))
def test_real_cell_storage_and_numerics(cell, quantized, float_models, float_ref):
    """Storage within the ceiling of the cell's bits with float16 embeddings, and (per-channel grids)
    with int8 embeddings. Without activation quantization the real model is the fake-quantized cell
    up to float rounding (W4A16: KL 0.00000, SQNR 67 dB measured). With 8-bit activations any perturbation,
    even the float16 rounding of the embeddings (5e-4 relative) or a different summation order,
    flips per-token rounding decisions at SmolLM2's outlier tokens: measured on this tier, rounding
    the embeddings alone moved the fake RTN W8A8 perplexity by +2.9%, and the real model's KL to its
    fake cell (0.020-0.064) is of the order of the cell's own KL to float (0.022-0.99). So A8 cells
    are gated relative to their own quantization noise here, and their perplexity against the fake
    cell on the quick profile's 82k tokens (slow tier: -0.14% measured for RTN W8A8)."""
    fmodel, _ = float_models(cell.model)
    qmodel, _ = quantized(cell)
    real = to_real(copy.deepcopy(qmodel))
    ratio = storage(real)["bytes"] / storage(fmodel)["bytes"]
    assert ratio <= _ceiling(cell, "float16", fmodel, real), f"storage x{ratio:.4f} of float16"
    ref = float_ref(cell.model, SHORT)
    fake, got = _logits(qmodel, ref.tokens), _logits(real, ref.tokens)
    kl_real = _kl(fake, got)
    if cell.cfg.a_bits == 16:
        ppl_ratio = _ppl(got, ref.tokens) / _ppl(fake, ref.tokens)
        assert kl_real < 1e-4 and abs(ppl_ratio - 1) <= REAL_PPL_RTOL, (kl_real, ppl_ratio)
    else:
        kl_fake = _kl({i: lp.float() for i, lp in ref.logprobs.items()}, fake)
        assert kl_real <= A8_KL_RATIO * kl_fake, (kl_real, kl_fake)
    if cell.cfg.group_size is None:          # the same real model with int8 token embeddings
        int8_embeddings_(real)
        ratio = storage(real)["bytes"] / storage(fmodel)["bytes"]
        assert ratio <= _ceiling(cell, "int8", fmodel, real), f"int8 embeddings: storage x{ratio:.4f} of float16"


@torch.no_grad()
def _logits(model, tokens) -> dict:
    return {i: lg[0] for i, _, lg in evaluate.window_logits(model, tokens, SHORT.seqlen, range(SHORT.windows))}


def _kl(p: dict, q: dict) -> float:
    """Mean over positions of KL(p || q), both given as logits per window."""
    tot = sum(F.kl_div(q[i].log_softmax(-1), p[i].log_softmax(-1), log_target=True, reduction="sum").item() for i in p)
    return tot / sum(p[i].shape[0] for i in p)


def _ppl(logits: dict, tokens) -> float:
    n = SHORT.seqlen
    nll = [F.cross_entropy(lg[:-1].double(), tokens[i * n + 1:(i + 1) * n], reduction="sum") for i, lg in logits.items()]
    return math.exp(sum(nll).item() / (len(logits) * (n - 1)))


@pytest.mark.parametrize("cell", cases(QUICK))
def test_track2_cell(cell, float_models, quantized, baseline, benchmark, request):
    fmodel, tok = float_models(cell.model)
    real = to_real(copy.deepcopy(quantized(cell)[0]))
    ids = infer.fixed_input(tok).to(next(fmodel.parameters()).device)
    tps_f, tps_r = infer.prefill_side_by_side([fmodel, real], ids)
    f = infer.measure(fmodel, ids, prefill_tok_s=tps_f)
    r = infer.measure(real, ids, prefill_tok_s=tps_r)
    benchmark.pedantic(real, args=(ids,), rounds=10, warmup_rounds=2)
    ratios = {"prefill_speedup": r.prefill_tok_s / f.prefill_tok_s,
              "decode_speedup": r.decode_tok_s / f.decode_tok_s,
              "memory_ratio": r.peak_mem_bytes / f.peak_mem_bytes,
              "storage_ratio": storage(real)["bytes"] / storage(fmodel)["bytes"]}
    benchmark.extra_info.update(ratios, device=r.device, peak_mem_bytes=r.peak_mem_bytes,
                                float_prefill_tok_s=f.prefill_tok_s, prefill_tok_s=r.prefill_tok_s)
    # weights in 8 bits or fewer (with the prepacked kernel copy) must take less memory than float32
    assert ratios["memory_ratio"] < 1, ratios
    # speed ratios differ by design between kernel paths (VNNI's one-pass int8 against the two-pass
    # kernel of AVX2): the baseline is kept per path the cell ran, within the device class
    path = "+".join(sorted(kernel_paths(real)))
    benchmark.extra_info.update(kernel_path=path, threads=torch.get_num_threads())
    gates.compare_or_skip(request, cell, {"ratios": ratios, "kernel_path": path},
                          baseline.use_extension(BaselineExtension.with_subdir(path)))


def infer_device() -> str:
    """The CPU's instruction set class or the GPU: speed ratios hold per class, not per machine."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return torch.backends.cpu.get_cpu_capability()


@pytest.mark.slow
@pytest.mark.smollm2
@pytest.mark.rtn
@pytest.mark.w8a8
def test_w8a8_prefill_speed_target(float_models, quantized):
    """Issue 6's target: a real W8A8 model prefills at least 1.3x as fast as float32. Integer kernels
    only win where the CPU sums int8 products in int32 (VNNI, AMX) or on a GPU; on AVX2 alone an
    exact 8-bit x 8-bit product needs two oneDNN passes (slmquant.real) and runs slower than float."""
    from slmquant.real import _has_vnni
    from tests.matrix import make_cell
    cell = make_cell("smollm2-135m", "rtn", "w8a8", {}, QUICK)
    fmodel, tok = float_models(cell.model)
    real = to_real(copy.deepcopy(quantized(cell)[0]))
    ids = infer.fixed_input(tok).to(next(fmodel.parameters()).device)
    tps_f, tps_r = infer.prefill_side_by_side([fmodel, real], ids)
    speedup = tps_r / tps_f
    if speedup < 1.3 and not (_has_vnni() or torch.cuda.is_available()):
        pytest.xfail(f"prefill x{speedup:.2f} of float32 on {infer_device()}: no int32-accumulating int8 "
                     "dot product on this CPU (docs/track2_measurements.md)")
    assert speedup >= 1.3


@pytest.mark.slow
@pytest.mark.smollm2
@pytest.mark.rtn
@pytest.mark.w8a8
def test_real_quick_profile_perplexity(float_models, quantized):
    """Issue 6: the real W8A8 model's perplexity within 0.5% of the fake-quantized cell's on the
    quick profile (first 40 windows of 2048). Through the measurement cache that
    `slmquant eval smollm2-135m rtn w8a8 [--real]` shares (about 25 min for the real model here)."""
    from slmquant.measure import MeasureCache
    from slmquant.real import measure_key
    from tests.matrix import make_cell
    cell = make_cell("smollm2-135m", "rtn", "w8a8", {}, QUICK)
    fmodel, tok = float_models(cell.model)
    tokens, store = evaluate.wikitext2_tokens(tok), MeasureCache()
    key = cell.key(fmodel.slmquant_source.key)
    kw = dict(seqlen=QUICK.seqlen, limit=QUICK.windows, progress=False)
    fake = store.wikitext2(key, lambda: quantized(cell)[0], tokens, **kw)
    real = to_real(copy.deepcopy(quantized(cell)[0]))
    got = store.wikitext2(measure_key(key, real), lambda: real, tokens, **kw)
    assert abs(got["ppl"] / fake["ppl"] - 1) <= REAL_PPL_RTOL, (got["ppl"], fake["ppl"])
