"""SpinQuant: the Cayley step stays on the orthogonal group and descends, the method's surgery (untie,
fuse, R4 offline + online in a QLinear, R1, R2) keeps the float logits, learned rotations are
orthogonal and shared by W8A8 and W4A8 through the rotation cache, and a cell survives the cell
cache and becomes a real low-bit model with its online Hadamard."""
import copy
import weakref

import pytest
import torch

from slmquant import rotation as rot
from slmquant.arch import decoder_layers, heads
from slmquant.attn import AttnInputQuant
from slmquant.errors import SlmquantError
from slmquant.methods import make_config, quantize
from slmquant.methods import spinquant as sq
from slmquant.models import tiny_model
from slmquant.quant import QLinear

pytestmark = [pytest.mark.spinquant, pytest.mark.w8a8, pytest.mark.w4a8, pytest.mark.w4a16]

TINY = {"calib_samples": 2, "calib_seqlen": 32, "steps": 2}


def test_cayley_steps_stay_orthogonal_and_descend():
    g = torch.Generator().manual_seed(0)
    R, T = rot.random_orthogonal(32, g), rot.random_orthogonal(32, g)
    loss = lambda R: float((R - T).pow(2).sum())
    before = loss(R)
    for _ in range(20):
        R = sq.cayley_step(R, 2 * (R - T), lr=0.5)          # gradient of ||R - T||_F^2
        assert rot.orthogonality_error(R) < 1e-12
    assert loss(R) < 0.5 * before


@pytest.mark.parametrize("r3", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_methods_surgery_keeps_the_float_logits(arch, r3):
    model, _ = tiny_model(arch, seed=3, dtype=torch.float64)
    ids = torch.randint(0, 5000, (2, 20))
    with torch.no_grad():
        ref = model(ids).logits
    sq.prepare_(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        rot.rotate_residual_(model, rot.random_hadamard(model.config.hidden_size, g))
        for layer in decoder_layers(model):
            rot.rotate_heads_(model, layer, rot.random_hadamard(heads(model)[2], g))
    sq.install_online_r4_(model)
    if r3:                                    # R3 online on Q and K after RoPE, the KV cache in float
        sq.install_attn_(model, make_config("spinquant", "w4a8", {"r3": True}))
        assert sum(isinstance(m, AttnInputQuant) and m.r3 for m in model.modules()) == len(decoder_layers(model))
    downs = [m for m in model.modules() if isinstance(m, QLinear)]
    assert len(downs) == len(decoder_layers(model)) and all(d.had == d.in_features for d in downs)
    with torch.no_grad():
        out = model(ids).logits
    assert (out - ref).abs().max() <= 1e-6 * ref.abs().max()     # float32 RMSNorm (test_rotation.py)


def _start(arch: str, seed: int, rot_seed: int, dtype=torch.float32):
    """A prepared tiny model, random Hadamards R1 and R2s in its dtype, and its decoder linears'
    weights (and v's bias) by parameter name: what both training forms start from."""
    from slmquant.arch import arch_map
    model, _ = tiny_model(arch, seed=seed, dtype=dtype)
    sq.prepare_(model)
    amap, hq = arch_map(model), heads(model)
    g = torch.Generator().manual_seed(rot_seed)
    params = [rot.random_hadamard(model.config.hidden_size, g).to(dtype)] + \
             [rot.random_hadamard(hq[2], g).to(dtype) for _ in decoder_layers(model)]
    base = {f"{amap.layers}.{i}.{n}.{t}": getattr(layer.get_submodule(n), t).detach()
            for i, layer in enumerate(decoder_layers(model)) for n in amap.linears for t in ("weight", "bias")
            if getattr(layer.get_submodule(n), t, None) is not None}
    return model, amap, hq, params, base


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_two_training_forms_compute_the_same_loss(arch):
    """Learning with float weights turns the rounded activations (no weight product per step); it
    must give the loss of the rotated-weight form (which rounded weights need) at the same R1, R2."""
    from torch.func import functional_call
    model, amap, hq, params, base = _start(arch, seed=6, rot_seed=2)
    a_spec = make_config("spinquant", "w8a8").a_spec
    w = torch.randint(0, 5000, (1, 32))
    losses = []
    for hooks in (lambda: sq._hooks_weight_side(model, params, amap, a_spec),
                  lambda: sq._hooks_activation_side(model, params, amap, hq, a_spec)):
        handles = hooks()
        with torch.no_grad():
            weights = sq._rotated(base, params[0], params[1:], amap, hq, None) if len(losses) == 0 else {}
            losses.append(functional_call(model, weights, (w,), {"labels": w}).loss.item())
        for h in handles:
            h.remove()
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_learning_with_rounded_weights_gives_the_one_graph_gradients_without_its_graph(monkeypatch):
    """The two-stage backward (the model's backward stops at the rounded weights; each layer's
    weights are then built again with their graph) must give the gradients in R1 and every R2 of
    one graph through the whole rotated, rounded model, over two windows; and the model must see
    the weights as leaves, with no graph of the rotation behind them (the memory it saves)."""
    from torch.func import functional_call
    model, amap, hq, params, base = _start("qwen2", seed=7, rot_seed=3, dtype=torch.float64)
    model.requires_grad_(False)
    params = [R.requires_grad_() for R in params]
    cfg = make_config("spinquant", "w4a8", {"learn_weights": "rtn"})
    handles = sq._hooks_weight_side(model, params, amap, cfg.a_spec)
    wins = [torch.randint(0, 5000, (1, 24)) for _ in range(2)]
    try:
        weights = sq._rotated(base, params[0], params[1:], amap, hq, cfg.w_spec)
        loss = sum(functional_call(model, weights, (w,), {"labels": w}).loss for w in wins) / 2
        ref = torch.autograd.grad(loss, params)
        seen, leaf, freed = [], [], []
        monkeypatch.setattr(sq, "functional_call", lambda m, ws, *a: seen.append(
            all(t.grad_fn is None and t.requires_grad for t in ws.values())) or leaf.append(
            weakref.ref(next(iter(ws.values())))) or functional_call(m, ws, *a))
        layer = sq._rotated_layer
        monkeypatch.setattr(sq, "_rotated_layer", lambda *a: (leaf and freed.append(leaf[-1]() is None)) or layer(*a))
        got, got_loss = sq._step_grads(model, wins, params, base, amap, hq, cfg.w_spec)
    finally:
        for h in handles:
            h.remove()
    # the second stage runs with the first stage's weights freed, one layer's graph at a time
    assert seen == [True, True] and freed == [True] * len(params[1:]) and got_loss == pytest.approx(loss.item(), rel=1e-6)   # the loss is float32
    assert len(got) == len(ref) and all(a.dtype == torch.float64 for a in got)
    for a, b in zip(got, ref):
        assert b.abs().max() > 0 and (a - b).abs().max() <= 1e-10 * b.abs().max()


def test_learned_rotations_are_orthogonal_and_shared_by_w8a8_and_w4a8(monkeypatch, tmp_path):
    monkeypatch.setenv("SLMQUANT_CACHE", str(tmp_path))
    model, _ = tiny_model("qwen2", seed=4)
    calib = torch.randint(0, 5000, (2, 32))
    calls = []
    learn = sq.learn_rotations
    monkeypatch.setattr(sq, "learn_rotations", lambda *a, **k: calls.append(a[2].scheme) or learn(*a, **k))
    for bits in ("w4a8", "w8a8", "w4a16"):
        q = quantize(copy.deepcopy(model), "spinquant", make_config("spinquant", bits, TINY), calib)
        info = q.slmquant_method_info
        assert info["learned"] and len(info["loss"]) == 2 and info["orthogonality_error"] < 1e-12
        assert all(p.grad is None for p in q.parameters())          # the frozen weights got none
    assert calls == ["w4a8", "w4a16"]         # W8A8 reads W4A8's rotations (both learned at W16A8)
    # learning against RTN-rounded weights at W4A8 is another learning, which sees the 4-bit grid
    seen = []
    rotated = sq._rotated
    monkeypatch.setattr(sq, "_rotated", lambda *a: seen.append(a[-1]) or rotated(*a))
    cfg = make_config("spinquant", "w4a8", {**TINY, "learn_weights": "rtn"})
    quantize(copy.deepcopy(model), "spinquant", cfg, calib)
    assert calls == ["w4a8", "w4a16", "w4a8"] and seen and all(s == cfg.w_spec and s.bits == 4 for s in seen)


@pytest.mark.parametrize("bits,extra", [("w4a8", {}), ("w4a16", {}), ("w4a16", {"w_clip": False}),
                                        ("w4a8", {"kv_bits": 4})])
def test_a_cell_survives_the_cache_and_becomes_a_real_model(bits, extra, tmp_path):
    """With the weight-clipping search (w_clip, the default) and without it: clipped ranges put codes
    at both ends of the grid, which the cache's grid recovery and the real kernels must carry
    unchanged."""
    from slmquant.cells import Cell, CellCache
    from slmquant.real import RealLinear, to_real
    model, tok = tiny_model("llama", seed=5)
    cell = Cell("tiny-llama", "spinquant", make_config("spinquant", bits, {**TINY, "weights": "rtn", **extra}))
    built, _, fresh = CellCache(tmp_path).get(cell, model, tok)
    again, _, cached = CellCache(tmp_path).get(cell, model, tok)
    ids = torch.randint(0, 5000, (1, 24))
    with torch.no_grad():
        out = built(ids).logits
        assert fresh and not cached and torch.equal(again(ids).logits, out)
        real = to_real(copy.deepcopy(built))
        got = real(ids).logits
        kept = {id(p) for q in built.modules() if isinstance(q, QLinear) for p in q.parameters()}
        for p in built.parameters():          # the real model stores its float parts as float16
            if id(p) not in kept:
                p.copy_(p.half().float())
        out = built(ids).logits
    assert sum(isinstance(m, RealLinear) and m.had is not None for m in real.modules()) == len(decoder_layers(real))
    kv = [(m.spec and m.spec.bits, m.q, m.r3) for m in real.modules() if isinstance(m, AttnInputQuant)]
    assert kv == ([(4, False, True)] * len(decoder_layers(real)) if extra.get("kv_bits") else [])
    if bits == "w4a16":                       # no activation rounding: the real model is the cell
        assert (got - out).abs().max() <= 1e-5 * out.abs().max()
    if bits == "w4a16" and not extra:         # the search moved some rows' ranges, not every row's
        plain = CellCache(tmp_path).get(Cell("tiny-llama", "spinquant", make_config(
            "spinquant", bits, {**TINY, "weights": "rtn", "w_clip": False})), model, tok)[0]
        w = [(a.weight.abs().amax(1), b.weight.abs().amax(1)) for a, b in zip(
            [m for m in built.modules() if isinstance(m, QLinear)], [m for m in plain.modules() if isinstance(m, QLinear)])]
        narrower = sum(int((c < p - 1e-6).sum()) for c, p in w)
        assert 0 < narrower < sum(c.numel() for c, _ in w)


def test_r3_spreads_key_outliers_before_the_kv_cache_rounds_them():
    """R3 leaves Q K^T unchanged in float and, with a key channel 30 times the others (as RoPE'd keys
    carry), the 4-bit KV cache's error on the attention scores falls by more than half."""
    from slmquant.quant import QSpec
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 64, generator=g, dtype=torch.float64) for _ in range(3))
    k[..., 5] *= 30
    exact = q @ k.transpose(-1, -2)
    turned = AttnInputQuant(None, q=False, r3=True).qkv(q, k, v)
    assert torch.allclose(turned[0] @ turned[1].transpose(-1, -2), exact, atol=1e-10)
    err = {}
    for r3 in (False, True):
        qq, kq, _ = AttnInputQuant(QSpec(4, sym=False, granularity="token"), q=False, r3=r3).qkv(q, k, v)
        assert torch.equal(qq, turned[0] if r3 else q)             # Q is never rounded
        err[r3] = float((qq @ kq.transpose(-1, -2) - exact).pow(2).mean())
    assert err[True] < 0.5 * err[False]


def test_a_rounded_kv_cache_is_learned_with_the_rotated_weights(monkeypatch, tmp_path):
    """With kv_bits < 16, learning takes the rotated-weight form (V is rounded in R2's basis) even when
    its weights are float (GPTQ follows), every attention of the learning and of GPTQ's pass reads
    the rounded KV cache, and the rotations are its own (another cache entry)."""
    from slmquant import attn
    monkeypatch.setenv("SLMQUANT_CACHE", str(tmp_path))
    model, _ = tiny_model("qwen2", seed=4)
    calib = torch.randint(0, 5000, (2, 32))
    forms, calls = [], {"learn": 0, "all": 0}
    side, qkv, learn = sq._hooks_weight_side, attn.AttnInputQuant.qkv, sq.learn_rotations

    def counted(self, *a):
        calls["all"] += 1
        return qkv(self, *a)

    def learning(*a, **k):
        before = calls["all"]
        out = learn(*a, **k)
        calls["learn"] += calls["all"] - before
        return out
    monkeypatch.setattr(sq, "_hooks_weight_side", lambda *a: forms.append("weights") or side(*a))
    monkeypatch.setattr(attn.AttnInputQuant, "qkv", counted)
    monkeypatch.setattr(sq, "learn_rotations", learning)
    n = len(decoder_layers(model))
    q = quantize(copy.deepcopy(model), "spinquant", make_config("spinquant", "w4a8", {**TINY, "kv_bits": 4}), calib)
    assert forms == ["weights"] and q.slmquant_method_info["learned"]
    assert calls["learn"] == TINY["steps"] * n and calls["all"] > calls["learn"]      # and GPTQ's pass
    assert len(list(tmp_path.glob("spinquant-rotations/*.pt"))) == 1
    quantize(copy.deepcopy(model), "spinquant", make_config("spinquant", "w4a8", TINY), calib)
    assert forms == ["weights"] and len(list(tmp_path.glob("spinquant-rotations/*.pt"))) == 2


def test_a_batch_step_averages_its_windows():
    """Two steps of batch=2 on windows a, a, b, b take the steps batch=1 takes on a, b (each step
    averages its own two windows); on a, b, a, b they differ; the paper profile steps on 8 windows."""
    from slmquant.profiles import profile_settings
    model, _ = tiny_model("llama", seed=7)
    sq.prepare_(model)
    a, b = torch.randint(0, 5000, (2, 32), generator=torch.Generator().manual_seed(3))
    learn = lambda windows, batch: sq.learn_rotations(model, torch.stack(windows), make_config(
        "spinquant", "w4a8", {**TINY, "steps": 2, "batch": batch}), progress=False)
    one, twice, mixed = learn([a, b], 1), learn([a, a, b, b], 2), learn([a, b, a, b], 2)
    assert torch.allclose(twice["R1"], one["R1"], atol=1e-12) and twice["loss"] == pytest.approx(one["loss"])
    assert (mixed["R1"] - one["R1"]).abs().max() > 1e-6
    assert profile_settings("spinquant", "paper", "w4a8") == {"batch": 8}


def test_bad_settings_and_gemma3_are_refused():
    with pytest.raises(SlmquantError, match="batch >= 1"):
        make_config("spinquant", "w4a8", {"batch": 0})
    with pytest.raises(SlmquantError, match="kv_bits must be in"):
        make_config("spinquant", "w4a8", {"kv_bits": 12})
    with pytest.raises(SlmquantError, match="weights must be"):
        make_config("spinquant", "w4a8", {"weights": "awq"})
    with pytest.raises(SlmquantError, match="learn_weights must be"):
        make_config("spinquant", "w4a8", {"learn_weights": "gptq"})
    with pytest.raises(SlmquantError, match="no rounding to reduce"):
        make_config("spinquant", "w4a16", {"learn_weights": "float"})
    with pytest.raises(SlmquantError, match="w_bits must be below 16"):
        make_config("spinquant", "w16a8")
    model, _ = tiny_model("gemma3_text")
    with pytest.raises(SlmquantError, match="post-attention and post-feedforward norms"):
        quantize(model, "spinquant", make_config("spinquant", "w4a8", TINY), torch.randint(0, 5000, (2, 32)))
