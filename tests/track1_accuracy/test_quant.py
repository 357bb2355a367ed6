"""Property tests of the rounding primitives (hypothesis) and of QLinear."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slmquant.errors import SlmquantError
from slmquant.quant import QLinear, QSpec, dequantize, fake_quant, parse_bits, qparams, quantize, round_ste

# the rounding every method shares: selected by `-m <bits>` and by the method's marker
pytestmark = [pytest.mark.rtn, pytest.mark.w8a8, pytest.mark.w4a8, pytest.mark.w4a16]

bits_st = st.integers(2, 8)
gran_st = st.sampled_from(["tensor", "channel", "token", ("group", 4), ("group", 8)])


def _spec(bits, sym, gran):
    if isinstance(gran, tuple):
        return QSpec(bits, sym, "group", gran[1])
    return QSpec(bits, sym, gran)


@st.composite
def tensors(draw):
    rows, cols = draw(st.integers(1, 6)), draw(st.sampled_from([8, 16, 24]))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g, dtype=torch.float64) * scale
    if draw(st.booleans()):
        x = x.abs() + draw(st.sampled_from([0.0, 0.5]))      # one-signed data
    return x


@settings(max_examples=150, deadline=None)
@given(x=tensors(), bits=bits_st, sym=st.booleans(), gran=gran_st)
def test_error_at_most_half_a_step_and_integer_range(x, bits, sym, gran):
    spec = _spec(bits, sym, gran)
    q, scale, zero = quantize(x, spec)
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    assert torch.equal(q.to(torch.float64), q.to(torch.float64).round())
    xq = fake_quant(x, spec)
    assert torch.allclose(dequantize(q, scale, zero, x.shape, x.dtype), xq)
    # every value lies inside the clipping range (clip_ratio 1): the error is at most half a step
    step = scale.expand_as(q.to(torch.float64)).reshape(x.shape)
    assert ((xq - x).abs() <= step / 2 * (1 + 1e-9) + 1e-12).all()


@settings(max_examples=100, deadline=None)
@given(x=tensors(), bits=bits_st, sym=st.booleans(), gran=gran_st)
def test_idempotent(x, bits, sym, gran):
    spec = _spec(bits, sym, gran)
    once = fake_quant(x, spec)
    assert torch.allclose(fake_quant(once, spec), once, rtol=0, atol=1e-9 * (1 + x.abs().max().item()))


@settings(max_examples=100, deadline=None)
@given(x=tensors(), bits=bits_st, gran=gran_st)
def test_zero_exactly_representable_asymmetric(x, bits, gran):
    x = x.clone()
    x[..., 0] = 0.0
    spec = _spec(bits, False, gran)
    assert (fake_quant(x, spec)[..., 0] == 0).all()
    _, _, zero = quantize(x, spec)
    assert torch.equal(zero, zero.round())


@settings(max_examples=100, deadline=None)
@given(x=tensors(), bits=st.integers(2, 7), gran=gran_st)
def test_symmetric_and_asymmetric_agree_on_nonnegative_data(x, bits, gran):
    """On x >= 0 an asymmetric b-bit grid has zero point 0 and step max/(2^b-1): exactly the
    symmetric (b+1)-bit grid."""
    x = x.abs()
    assert torch.allclose(fake_quant(x, _spec(bits, False, gran)), fake_quant(x, _spec(bits + 1, True, gran)))


def test_per_group_of_full_width_is_per_channel_and_token_is_channel():
    x = torch.randn(5, 16, dtype=torch.float64)
    assert torch.equal(fake_quant(x, QSpec(4, True, "group", 16)), fake_quant(x, QSpec(4, True, "channel")))
    assert torch.equal(fake_quant(x, QSpec(8, False, "token")), fake_quant(x, QSpec(8, False, "channel")))


def test_symmetric_scale_formula():
    x = torch.tensor([[-3.0, 1.0, 2.54]])
    scale, zero = qparams(x, QSpec(8, True, "channel"))
    assert scale.item() == pytest.approx(3.0 / 127) and zero.item() == 0
    q, _, _ = quantize(x, QSpec(8, True))
    assert q.tolist() == [[-127, 42, 108]]
    scale, zero = qparams(torch.tensor([[0.5, 2.0]]), QSpec(4, False))     # min widened to 0
    assert scale.item() == pytest.approx(2.0 / 15) and zero.item() == 0


def test_groups_that_do_not_divide_are_refused():
    with pytest.raises(SlmquantError, match="group_size 128 does not divide the width 576"):
        fake_quant(torch.randn(2, 576), QSpec(4, True, "group", 128))
    with pytest.raises(SlmquantError):
        QSpec(4, True, "group", None)
    with pytest.raises(SlmquantError):
        QSpec(9)


@pytest.mark.parametrize("bits,expected", [("w8a8", (8, 8)), ("W4A16", (4, 16)), ("w16a16", (16, 16)),
                                           ("w2a4", (2, 4))])
def test_parse_bits(bits, expected):
    assert parse_bits(bits) == expected


@pytest.mark.parametrize("bits", ["w4", "w1a8", "w9a8", "w4a3", "w4a32", "int8", ""])
def test_parse_bits_refuses(bits):
    with pytest.raises(SlmquantError, match="w"):
        parse_bits(bits)


def test_round_ste_gradient_is_identity():
    x = torch.tensor([0.2, 1.7, -2.5], requires_grad=True)
    y = round_ste(x)
    y.sum().backward()
    assert y.tolist() == [0.0, 2.0, -2.0] and x.grad.tolist() == [1.0, 1.0, 1.0]


def test_qlinear_matches_a_hand_written_reference():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8, bias=True).double()
    w, a = QSpec(4, True, "channel"), QSpec(8, True, "token")
    q = QLinear.from_linear(lin, w, a)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    # reference: weights per output row, activations per token, symmetric
    ws = lin.weight.abs().amax(1, keepdim=True) / 7
    W = (lin.weight / ws).round().clamp(-8, 7) * ws
    xs = x.abs().amax(-1, keepdim=True) / 127
    X = (x / xs).round().clamp(-128, 127) * xs
    assert torch.allclose(q(x), X @ W.T + lin.bias)
    assert "W=int4/sym/channel" in repr(q) and "A=int8/sym/token" in repr(q)
    assert torch.equal(QLinear.from_linear(lin, None, None)(x), lin(x))


@pytest.mark.parametrize("bits", [4, 8])
def test_full_grid_uses_every_level_as_the_gptq_reference_does(bits):
    """full_grid: scale 2 max|x| / (2^b - 1) and codes -2^(b-1)..2^(b-1)-1, as the GPTQ reference's
    quantizer (zero point 2^(b-1) on unsigned codes), written out here by hand."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g, dtype=torch.float64)
    spec = QSpec(bits, True, "channel", full_grid=True)
    amax = x.abs().amax(-1, keepdim=True)
    ref_scale = 2 * amax / (2**bits - 1)
    ref = (torch.clamp(torch.round(x / ref_scale) + 2 ** (bits - 1), 0, 2**bits - 1) - 2 ** (bits - 1)) * ref_scale
    assert torch.allclose(fake_quant(x, spec), ref, rtol=0, atol=1e-12)
    q, _, _ = quantize(x, spec)
    assert (int(q.min()), int(q.max())) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)           # both ends
    q_std, _, _ = quantize(x, QSpec(bits, True, "channel"))
    assert int(q_std.min()) == -(2 ** (bits - 1)) + 1                                          # one unused
    # the error bound: half a step, except +max|x| clipped by exactly half a step
    assert float((fake_quant(x, spec) - x).abs().max() / ref_scale.max()) <= 0.5 + 1e-9
