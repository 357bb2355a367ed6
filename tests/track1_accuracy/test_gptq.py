"""GPTQ against references: a hand-computed two-column case, its invariants (16-bit weights are the
identity, the lazy blocks change nothing, results lie on the quantization grid) and its purpose
(lower layer output error than round-to-nearest on the same calibration data)."""
import dataclasses

import pytest
import torch

from slmquant.calib import accumulate_hessian, capture_layer_inputs, make_hessian, run_layer
from slmquant.errors import SlmquantError
from slmquant.methods import make_config, quantize
from slmquant.methods.gptq import gptq_weight
from slmquant.models import SUPPORTED_ARCHS, tiny_model
from slmquant.quant import QSpec, fake_quant, qparams
from slmquant.codes import grid_of

# GPTQ's unit and equivalence tests guard every GPTQ cell: selected by `-m <bits>` and by the method's marker
pytestmark = [pytest.mark.gptq, pytest.mark.w8a8, pytest.mark.w4a8, pytest.mark.w4a16]


def _data(seed=0, rows=24, cols=64, tokens=512):
    """Weights and correlated inputs (a few dominant directions, as in real activations)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64) * torch.logspace(0, -2, cols, dtype=torch.float64)
    X = torch.randn(tokens, cols, generator=g, dtype=torch.float64) @ mix.T
    st = make_hessian(cols)
    accumulate_hessian(st, X)
    return W, X, st["H"].double()


def _err(W, Q, X):
    return ((X @ (W - Q).T) ** 2).sum().item()


def test_two_columns_by_hand():
    """Round column 0, move its error onto column 1 by -H10/H11 (the optimal update), round it."""
    spec = QSpec(4, sym=True, granularity="channel")
    W = torch.tensor([[0.355, 0.70], [0.05, 0.42]], dtype=torch.float64)   # row 0: scale 0.1
    H = torch.tensor([[2.0, 1.2], [1.2, 1.0]], dtype=torch.float64)
    scale, zero = qparams(W, spec)
    q0 = fake_quant(W[:, :1], spec, scale, zero)[:, 0]
    w1 = W[:, 1] - (H[1, 0] / H[1, 1]) * (q0 - W[:, 0])
    q1 = fake_quant(w1[:, None], spec, scale, zero)[:, 0]
    Q, _, _ = gptq_weight(W, H, spec, damp=0.0)
    assert torch.allclose(Q, torch.stack([q0, q1], 1), atol=1e-12)
    assert not torch.equal(Q, fake_quant(W, spec))          # the update changed a rounding


def test_sixteen_bit_weights_are_the_identity():
    W, _, H = _data()
    Q, loss, _ = gptq_weight(W, H, None)
    assert torch.equal(Q, W) and loss == 0.0


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_gptq_w16a16_leaves_the_model_unchanged(arch):
    model, _ = tiny_model(arch, seed=2, dtype=torch.float64)
    ids = torch.randint(0, 5000, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
        quantize(model, "gptq", make_config("gptq", "w16a16", {"calib_samples": 2, "calib_seqlen": 16}),
                 calib=torch.randint(0, 5000, (2, 16)))
        assert "QLinear" in repr(model.model.layers[0].self_attn.q_proj)
        assert torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("act_order,static_groups", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("group_size", [None, 16])
def test_lazy_blocks_change_nothing(act_order, static_groups, group_size):
    W, _, H = _data(1)
    spec = QSpec(3, sym=False, granularity="group" if group_size else "channel", group_size=group_size)
    ref, _, _ = gptq_weight(W, H, spec, block_size=W.shape[1], act_order=act_order, static_groups=static_groups)
    for bs in (1, 7, 32):
        Q, _, _ = gptq_weight(W, H, spec, block_size=bs, act_order=act_order, static_groups=static_groups)
        assert torch.allclose(Q, ref, atol=1e-9), bs


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size,act_order", [(None, False), (None, True), (16, False), (16, True)])
def test_gptq_beats_rtn_on_the_layer_objective(sym, group_size, act_order):
    W, X, H = _data(2)
    spec = QSpec(4, sym=sym, granularity="group" if group_size else "channel", group_size=group_size)
    Q, _, _ = gptq_weight(W, H, spec, act_order=act_order)
    rtn = fake_quant(W, spec)
    assert _err(W, Q, X) < 0.8 * _err(W, rtn, X)
    # every row (group) is on a grid of 2^bits levels: the weights are really 4-bit
    for row in Q.reshape(-1, group_size or W.shape[1]):
        assert row.unique().numel() <= 16


def test_act_order_uses_static_groups_on_consecutive_channels():
    W, _, H = _data(3)
    spec = QSpec(4, sym=True, granularity="group", group_size=16)
    Q, _, _ = gptq_weight(W, H, spec, act_order=True)
    col = dataclasses.replace(spec, granularity="channel", group_size=None)
    for g in range(0, W.shape[1], 16):           # each group on the grid fixed by the original weights
        scale, zero = qparams(W[:, g:g + 16], col)
        assert torch.allclose(fake_quant(Q[:, g:g + 16], col, scale, zero), Q[:, g:g + 16], atol=1e-12)


def test_act_order_without_static_groups_groups_the_rounding_order():
    """Groups of 16 consecutive columns in the order of decreasing Hessian diagonal, each on its own
    grid; g_idx names every column's group, and GPTQ still beats RTN on the same (consecutive) groups."""
    W, X, H = _data(3)
    spec = QSpec(4, sym=True, granularity="group", group_size=16)
    Q, _, g_idx = gptq_weight(W, H, spec, act_order=True, static_groups=False)
    order = torch.argsort(torch.diag(H), descending=True)
    assert torch.equal(g_idx[order].long(), torch.arange(W.shape[1]) // 16)
    assert gptq_weight(W, H, spec, act_order=True)[2] is None and gptq_weight(W, H, spec)[2] is None
    gathered = Q[:, torch.argsort(g_idx, stable=True)]          # each group's columns side by side
    grid_of(gathered, spec)                                      # raises unless every group is on a 4-bit grid
    with pytest.raises(SlmquantError, match="not on a"):
        grid_of(Q, spec)                                         # consecutive channels are not groups here
    assert _err(W, Q, X) < 0.8 * _err(W, fake_quant(W, spec), X)


def test_dead_inputs_are_zeroed():
    W, _, H = _data(4)
    H[5, :] = 0
    H[:, 5] = 0
    Q, _, _ = gptq_weight(W, H, QSpec(4))
    assert torch.all(Q[:, 5] == 0)


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_gptq_layer_output_error_below_rtn(arch):
    """The first decoder layer of a tiny model, quantized W4 by GPTQ and by RTN on the same
    calibration windows: GPTQ's output error on those windows is lower."""
    calib = torch.randint(0, 5000, (8, 64))
    outs = {}
    for method in ("float", "rtn", "gptq"):
        model, _ = tiny_model(arch, seed=6)
        if method != "float":
            quantize(model, method, make_config(method, "w4a16", {"calib_samples": 8, "calib_seqlen": 64}
                                                 if method == "gptq" else {}), calib=calib)
        state = capture_layer_inputs(model, calib)
        outs[method] = torch.cat(run_layer(model.model.layers[0], state.hidden, state.layer_kwargs[0]))
    err = {m: (outs[m] - outs["float"]).pow(2).sum().item() for m in ("rtn", "gptq")}
    assert err["gptq"] < err["rtn"], err


def test_rows_round_independently():
    """What lets q/k/v (one Hessian) be rounded as one stacked matrix."""
    W, _, H = _data(5)
    spec = QSpec(4, sym=False)
    Q, _, _ = gptq_weight(W, H, spec)
    parts = [gptq_weight(w, H, spec)[0] for w in W.split([10, 14])]
    assert torch.allclose(Q, torch.cat(parts), atol=1e-12)


def _clip_search_by_hand(row: torch.Tensor, bits: int, sym: bool) -> float:
    """The least error of one row's rounding over the reference quantizer's clipping search,
    written out: ranges p * (min, max) for p = 1.00, 0.99, ..., 0.21, error sum |q - w|^2.4."""
    best = float("inf")
    for i in range(80):
        p = 1 - i / 100
        lo, hi = min(row.min().item(), 0.0) * p, max(row.max().item(), 0.0) * p
        if sym:
            scale, zero = max(-lo, hi) / (2 ** (bits - 1) - 1), 0.0
            qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1          # codes -8..7 at 4 bits
        else:
            scale = (hi - lo) / (2 ** bits - 1)
            zero, qmin, qmax = round(-lo / scale), 0, 2 ** bits - 1
        q = (torch.clamp(torch.round(row / scale) + zero, qmin, qmax) - zero) * scale
        best = min(best, (q - row).abs().pow(2.4).sum().item())
    return best


@pytest.mark.parametrize("sym", [True, False])
def test_clip_search_matches_the_hand_written_search(sym):
    from slmquant.methods.gptq import mse_qparams
    g = torch.Generator().manual_seed(3)
    W = torch.randn(6, 64, generator=g, dtype=torch.float64)
    W[0, 5] = 9.0                                    # an outlier: the search must clip this row
    spec = QSpec(4, sym=sym, granularity="channel")
    scale, zero = mse_qparams(W, spec)
    got = fake_quant(W, spec, scale, zero)
    plain = ((fake_quant(W, spec) - W).abs() ** 2.4).sum(1)
    clipped = ((got - W).abs() ** 2.4).sum(1)
    for r in range(W.shape[0]):          # the least error (two ranges may tie to the last bits)
        assert clipped[r].item() == pytest.approx(_clip_search_by_hand(W[r], 4, sym), rel=1e-9), r
    assert (clipped <= plain + 1e-12).all() and clipped[0] < plain[0]


def test_clip_search_with_an_uncorrelated_hessian_is_clipped_rtn():
    """With H = I nothing feeds back: GPTQ with w_clip is round-to-nearest on the searched ranges."""
    from slmquant.methods.gptq import mse_qparams
    W, _, _ = _data(rows=8, cols=32)
    spec = QSpec(4, sym=False, granularity="channel")
    Q, _, _ = gptq_weight(W, torch.eye(32, dtype=torch.float64), spec, damp=0.0, w_clip=True)
    assert torch.equal(Q, fake_quant(W, spec, *mse_qparams(W, spec)))
    assert not torch.equal(Q, gptq_weight(W, torch.eye(32, dtype=torch.float64), spec, damp=0.0)[0])


def test_clip_search_lowers_the_layer_error_of_gptq_at_4_bits():
    W, X, H = _data(seed=4, rows=32, cols=64)
    W[:, 3] *= 6                                     # a few large weights per row
    spec = QSpec(4, sym=True, granularity="channel")
    plain, _, _ = gptq_weight(W, H, spec, act_order=True)
    clipped, _, _ = gptq_weight(W, H, spec, act_order=True, w_clip=True)
    assert _err(W, clipped, X) < _err(W, plain, X)
