"""Real low-bit models: integer codes recovered exactly from fake-quantized weights, 4-bit packing,
integer kernels against the fake-quantized layer, whole tiny models of every method and
architecture against their fake-quantized cells, save and load in one call, storage accounting."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slmquant.errors import SlmquantError
from slmquant.methods import make_config, quantize
from slmquant.models import SUPPORTED_ARCHS, tiny_model
from slmquant.quant import QLinear, QSpec, fake_quant
from slmquant.codes import grid_of, pack4, unpack4
from slmquant.real import (RealLinear, _has_vnni, int8_embeddings_, kernel_paths, load_real, save_real, storage,
                           to_real)

# integer kernels, exact against the fake-quantized layers of every method: selected by `-m <bits>`
pytestmark = [pytest.mark.w8a8, pytest.mark.w4a8, pytest.mark.w4a16]


@st.composite
def weights_on_a_grid(draw):
    bits = draw(st.sampled_from([4, 8]))
    sym = draw(st.booleans())
    group = draw(st.sampled_from([None, 8, 16]))
    spec = QSpec(bits, sym, "group" if group else "channel", group)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    W = torch.randn(draw(st.integers(1, 6)), 32, generator=g) * draw(st.sampled_from([1e-3, 1.0, 30.0]))
    Wq = fake_quant(W, spec)
    if draw(st.booleans()):            # codes that never reach the extremes (as GPTQ may leave them)
        scale = Wq.abs().max() / spec.qmax
        Wq = (Wq / scale).round().clamp(-2, 3) * scale
    return Wq, spec


@settings(max_examples=60, deadline=None)
@given(weights_on_a_grid())
def test_grid_is_recovered_exactly(case):
    W, spec = case
    u, scale, zero = grid_of(W, spec)
    assert u.dtype == torch.uint8 and int(u.max()) <= 2 ** spec.bits - 1
    g = u.reshape(W.shape[0], scale.shape[1], -1).float()
    back = ((g - zero.float().unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(W.shape)
    assert torch.allclose(back, W, rtol=1e-6, atol=1e-7 * float(W.abs().max()))


def _first_step(W: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """Reference for grid_of's step: per row or group, span / k for the quantizer's own k (its
    extreme code used) where that fits, else for the first k in 1..2^bits - 1 that makes every value
    an integer number of steps (tolerance as grid_of's), by plain search."""
    rows = W.double().reshape(W.shape[0], -1, spec.group_size or W.shape[1]).flatten(0, 1)
    out = []
    for r in rows:
        span = float(r.abs().max()) if spec.sym else float(r.max() - r.min())
        if span == 0:
            out.append(None)
            continue
        own = spec.qmax if spec.sym else 2 ** spec.bits - 1
        k = next(k for k in (own, *range(1, 2 ** spec.bits)) if
                 float(((r / (span / k)) - (r / (span / k)).round()).abs().max()) <= 1e-3)
        out.append(span / k)
    return out


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([4, 8]), st.booleans(), st.sampled_from([None, 8, 16]), st.sampled_from([1, 2, 3]),
       st.integers(0, 2**31 - 1))
def test_grid_step_is_the_coarsest_that_fits(bits, sym, group, every, seed):
    """grid_of's shortcut (the step from the smallest gap between values) gives the plain search's
    first step, also where the codes used are only every `every`-th level (a coarser grid fits)."""
    spec = QSpec(bits, sym, "group" if group else "channel", group)
    g = torch.Generator().manual_seed(seed)
    top = (2 ** (bits - 1) - 1) // every
    n = torch.randint(-top, top + 1, (4, 32), generator=g) * every       # integer steps, every k-th
    W = (n * torch.rand(4, 1, generator=g).add(0.01)).float()
    _, scale, _ = grid_of(W, spec)
    for got, want in zip(scale.flatten().tolist(), _first_step(W, spec)):
        if want is not None:
            assert got == torch.tensor(want, dtype=torch.float32).item()     # scales are float32


def test_weights_off_the_grid_are_refused():
    with pytest.raises(SlmquantError, match="not on a"):
        grid_of(torch.randn(4, 32), QSpec(4, True, "channel"))


@settings(deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_pack4_roundtrip(seed):
    u = torch.randint(0, 16, (3, 10), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    p = pack4(u)
    assert p.shape == (3, 5) and torch.equal(unpack4(p), u)


SPECS = [(QSpec(8, True, "channel"), QSpec(8, True, "token")),
         (QSpec(4, True, "channel"), QSpec(8, True, "token")),
         (QSpec(4, False, "channel"), QSpec(8, True, "token")),
         (QSpec(8, False, "channel"), QSpec(8, False, "token")),
         (QSpec(4, False, "channel"), QSpec(8, False, "token")),
         (QSpec(4, True, "channel"), None),
         (QSpec(4, False, "group", 16), None)]


@pytest.mark.parametrize("w_spec,a_spec", SPECS, ids=[f"{w}-{a}" for w, a in SPECS])
def test_real_linear_computes_what_the_fake_quantized_layer_computes(w_spec, a_spec):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=True)
    q = QLinear.from_linear(lin, w_spec, a_spec)
    r = RealLinear.from_qlinear(q)
    x = torch.randn(3, 7, 64) * 3
    ref = q(x)
    assert r.kernel == RealLinear.default_kernel(w_spec, a_spec)
    kernels = ["dequant"] if a_spec is None else ["int_mm", "dequant", "onednn_u7x2"]
    if a_spec is not None and w_spec.bits == 4:
        kernels.append("onednn_u8s8")          # exact on any x86 with 4-bit weights
    elif a_spec is not None and _has_vnni():
        kernels.append("onednn_u8s8")          # and with 8-bit weights where int8 products sum in int32
    for kernel in kernels:
        out = RealLinear.from_qlinear(q, kernel)(x)
        assert out.shape == ref.shape
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max())), kernel
    assert r.qweight.dtype == (torch.int8 if w_spec.bits == 8 else torch.uint8)
    assert r.qweight.numel() == 48 * 64 // (8 // w_spec.bits)


def test_real_linear_with_a_group_index():
    """Groups that are not consecutive channels (GPTQ's act-order groups): codes gathered by g_idx,
    computed as the fake-quantized layer, saved and rebuilt from meta; a g_idx that does not give
    every group group_size channels is refused."""
    torch.manual_seed(0)
    spec = QSpec(4, True, "group", 16)
    lin = torch.nn.Linear(64, 48, bias=True)
    perm = torch.randperm(64)
    g_idx = (torch.argsort(perm) // 16).to(torch.int32)           # channel perm[j] is j-th in order
    W = fake_quant(lin.weight[:, perm], spec)[:, torch.argsort(perm)]
    q = QLinear.from_linear(lin, spec, None, weight=W, g_idx=g_idx)
    r = RealLinear.from_qlinear(q)
    x = torch.randn(3, 7, 64)
    assert torch.allclose(r(x), q(x), rtol=1e-5, atol=1e-5) and torch.equal(r.g_idx, g_idx)
    again = RealLinear.from_meta(r.meta())
    again.load_state_dict(r.state_dict())
    assert torch.equal(again(x), r(x))
    with pytest.raises(SlmquantError, match="not on a"):                    # consecutive groups: off-grid
        RealLinear.from_qlinear(QLinear.from_linear(lin, spec, None, weight=W))
    q.g_idx[0] = 1 - q.g_idx[0].clamp(max=1)
    with pytest.raises(SlmquantError, match="does not give every group 16 channels"):
        RealLinear.from_qlinear(q)
    with pytest.raises(SlmquantError, match="takes one weight scale per row"):
        RealLinear(64, 48, True, spec, QSpec(8, True, "token"), kernel="int_mm")


def _cells():
    return [("rtn", "w8a8", {}), ("rtn", "w4a8", {"sym": False}), ("rtn", "w4a16", {"group_size": 32}),
            ("gptq", "w4a8", {"calib_samples": 2, "calib_seqlen": 64}),
            ("gptq", "w4a16", {"group_size": 16, "static_groups": False, "calib_samples": 2, "calib_seqlen": 64}),
            ("smoothquant", "w8a8", {"calib_samples": 2, "calib_seqlen": 64}),
            ("rtn", "w8a8", {"full_grid": True}),
            ("gptq", "w4a8", {"full_grid": True, "calib_samples": 2, "calib_seqlen": 64}),
            ("omniquant", "w4a8", {"calib_samples": 2, "calib_seqlen": 64, "epochs": 2}),
            ("omniquant", "w8a8", {"calib_samples": 2, "calib_seqlen": 64, "epochs": 2}),
            ("omniquant", "w4a16", {"group_size": 16, "calib_samples": 2, "calib_seqlen": 64, "epochs": 2})]


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
@pytest.mark.parametrize("method,bits,over", _cells(), ids=lambda v: v if isinstance(v, str) else None)
def test_real_model_matches_its_fake_quantized_cell(arch, method, bits, over, tmp_path):
    from slmquant.data import calib_windows
    model, tok = tiny_model(arch, seed=1)
    cfg = make_config(method, bits, over)
    calib = calib_windows(tok, cfg.calib_samples, cfg.calib_seqlen, 0) if hasattr(cfg, "calib_samples") else None
    quantize(model, method, cfg, calib)
    ids = torch.randint(0, 2000, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        real = to_real(copy.deepcopy(model))
        out = real(ids).logits
        kept = {id(p) for q in model.modules() if isinstance(q, QLinear) for p in q.parameters()}
        for p in model.parameters():          # the fake cell with its float parts stored as float16
            if id(p) not in kept:
                p.copy_(p.half().float())
        ref = model(ids).logits
    # integer codes and kernels compute what the fake-quantized layers compute, up to float32
    # rounding (exact per layer: test above); through a model, a last-bit difference can move a
    # dynamic activation across a rounding boundary, one step of 1/127 of its row's range
    err = (out - ref).abs() / ref.abs().max()
    assert float(err.max()) < 0.02 and float(err.mean()) < 1e-3, (float(err.max()), float(err.mean()))
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95
    paths = kernel_paths(real)
    assert sum(paths.values()) == 7 * 2
    assert set(paths) == {"dequant"} if bits == "w4a16" else set(paths) <= {"onednn_u8s8", "onednn_u7x2", "int_mm"}
    save_real(real, tok, tmp_path, {"cell": "test"})
    again, _ = load_real(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, out)
    assert again.slmquant_real["kernels"] == paths and again.slmquant_record == {"cell": "test"}


@pytest.mark.omniquant
@pytest.mark.w4a8
def test_a_saved_real_model_keeps_its_rounded_attention_inputs(tmp_path):
    """OmniQuant with quant_attn: the real model saved and loaded rounds Q, K and V as before."""
    from slmquant import attn
    model, tok = tiny_model("qwen2", seed=6)
    calib = torch.randint(0, 5000, (2, 32))
    quantize(model, "omniquant", make_config("omniquant", "w4a8", {"calib_samples": 2, "calib_seqlen": 32,
                                                                   "epochs": 1, "quant_attn": True}), calib)
    ids = torch.randint(0, 2000, (1, 16))
    with torch.no_grad():
        real = to_real(copy.deepcopy(model))
        out = real(ids).logits
    save_real(real, tok, tmp_path)
    again, _ = load_real(tmp_path)
    assert again.config._attn_implementation == attn.NAME
    assert sum(isinstance(m, attn.AttnInputQuant) for m in again.modules()) == 2
    with torch.no_grad():
        assert torch.equal(again(ids).logits, out)


def test_int8_embeddings_share_the_tied_head_and_shrink_storage(tmp_path):
    model, tok = tiny_model("llama")
    float16 = storage(model)
    quantize(model, "rtn", make_config("rtn", "w8a8"))
    ids = torch.randint(0, 2000, (1, 16))
    with torch.no_grad():
        ref = model(ids).logits
        real = to_real(copy.deepcopy(model), embeddings="int8")
        out = real(ids).logits
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    st_ = save_real(real, tok, tmp_path)
    vocab, dim = model.config.vocab_size, model.config.hidden_size
    assert st_["embedding_bytes"] == vocab * dim + 4 * vocab            # int8 codes + float32 row scales, once
    assert st_["bytes"] < 0.56 * float16["bytes"]
    again, _ = load_real(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, out)
        # the same model made in two steps (track 2's tests): float16 embeddings, then int8 ones
        assert torch.equal(int8_embeddings_(to_real(copy.deepcopy(model)))(ids).logits, out)
    with pytest.raises(SlmquantError, match="float16 embeddings"):
        int8_embeddings_(real)                                          # already int8


def test_storage_counts_tied_weights_once():
    model, _ = tiny_model("llama")
    s = storage(model)
    n = sum(p.numel() for p in model.parameters())         # parameters() yields a tied tensor once
    assert s["bytes"] == 2 * n and s["embedding_bytes"] == 2 * model.config.vocab_size * model.config.hidden_size


def test_real_models_need_a_quantized_cell_and_a_saved_folder(tmp_path):
    model, _ = tiny_model("llama")
    with pytest.raises(SlmquantError, match="no quantized linear"):
        to_real(model)
    with pytest.raises(SlmquantError, match="model.safetensors is missing"):
        load_real(tmp_path)
    quantize(model, "rtn", make_config("rtn", "w8a8"))
    with pytest.raises(SlmquantError, match="embeddings 'int4'"):
        to_real(model, embeddings="int4")


def test_int8_head_paths_agree():
    """The weight-only int8 kernel and the dequantize-once path compute the same LM head."""
    from slmquant.real import Int8TiedHead
    model, _ = tiny_model("llama")
    quantize(model, "rtn", make_config("rtn", "w8a8"))
    real = to_real(model, embeddings="int8")
    head = real.lm_head
    h = torch.randn(2, 7, model.config.hidden_size)
    with torch.no_grad():
        outs = {p: Int8TiedHead(head.emb[0], p)(h) for p in Int8TiedHead.PATHS}
    assert torch.allclose(outs["int8pack"], outs["dequant"], rtol=1e-4, atol=1e-4)
    assert kernel_paths(real)[f"lm_head_{head.path}"] == 1
    with pytest.raises(SlmquantError, match="LM head path"):
        Int8TiedHead(head.emb[0], "fp8")


@pytest.mark.parametrize("bits", ["w4a16", "w8a8"])
def test_full_grid_weights_recover_their_lowest_code(bits):
    """Weights on the full symmetric grid (code -2^(b-1) used) recover exactly into integer codes;
    the real models of such cells run in test_real_model_matches_its_fake_quantized_cell."""
    model, _ = tiny_model("llama")
    q = quantize(model, "rtn", make_config("rtn", bits, {"full_grid": True}))
    lin = q.model.layers[0].mlp.down_proj
    u, scale, zero = grid_of(lin.weight, lin.w_spec)
    assert int(u.min()) == 0 and int((u == 0).sum()) >= 1
    assert torch.allclose((u.double() - zero) * scale, lin.weight.double(), rtol=0, atol=1e-7)
