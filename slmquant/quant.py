"""All rounding lives here: quantization specs, integer quantize/dequantize, pure fake_quant, a
straight-through round for methods that train, and QLinear, the fake-quantized linear layer.

Symmetric b-bit: q in [-2^(b-1), 2^(b-1)-1], scale = max|x| / (2^(b-1)-1), zero = 0: code -2^(b-1)
is never used (15 of 16 levels at 4 bits). With full_grid, scale = max|x| / (2^(b-1) - 1/2), the
grid of the GPTQ reference code and llm-compressor (scale 2 max|x| / (2^b - 1), zero point 2^(b-1)):
+max|x| rounds to 2^(b-1)-1/2 and is clipped half a step, -max|x| reaches -2^(b-1), every level is used.
Asymmetric b-bit: q in [0, 2^b-1] over [min(x,0), max(x,0)], scale = range / (2^b-1),
zero = round(-min / scale), so that 0.0 is exactly representable."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import SlmquantError
from .rotation import fht

GRANULARITIES = ("tensor", "channel", "group", "token")


@dataclass(frozen=True)
class QSpec:
    """How one tensor is quantized.

    bits: 2..8. sym: symmetric (zero = 0) or asymmetric (min/max with a zero point).
    granularity: "tensor" (one scale), "channel" (one per output row of a weight), "token" (one per
    row of an activation: same reduction as "channel", over the last dim), "group" (one per
    `group_size` consecutive elements of the last dim).
    dynamic: scales computed from the tensor at hand (activations), else fixed by calibration.
    clip_ratio: the range is shrunk by this factor before rounding (1.0: plain min/max).
    full_grid: symmetric grids use all 2^bits levels (see the module docstring)."""
    bits: int
    sym: bool = True
    granularity: str = "channel"
    group_size: int | None = None
    dynamic: bool = True
    clip_ratio: float = 1.0
    full_grid: bool = False

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise SlmquantError(f"quantization bits must be in 2..8, got {self.bits}")
        if self.granularity not in GRANULARITIES:
            raise SlmquantError(f"granularity {self.granularity!r}: choose from {GRANULARITIES}")
        if (self.granularity == "group") != (self.group_size is not None):
            raise SlmquantError("group_size is required with, and only with, granularity='group'")
        if self.group_size is not None and self.group_size < 1:
            raise SlmquantError(f"group_size must be positive, got {self.group_size}")
        if not 0 < self.clip_ratio <= 1:
            raise SlmquantError(f"clip_ratio must be in (0, 1], got {self.clip_ratio}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.sym else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.sym else 2 ** self.bits - 1

    def __str__(self) -> str:
        g = f"g{self.group_size}" if self.group_size else self.granularity
        kind = ("sym-full" if self.full_grid else "sym") if self.sym else "asym"
        return f"int{self.bits}/{kind}/{g}{'' if self.dynamic else '/static'}"


def parse_bits(bits: str) -> tuple[int, int]:
    """'w4a8' -> (4, 8). Weights 2..8 or 16, activations 4..8 or 16 (16: left in floating point)."""
    m = re.fullmatch(r"w(\d+)a(\d+)", bits.strip().lower())
    if not m:
        raise SlmquantError(f"bits {bits!r} is not of the form wXaY (e.g. w8a8, w4a8, w4a16)")
    w, a = int(m[1]), int(m[2])
    if not (2 <= w <= 8 or w == 16):
        raise SlmquantError(f"weight bits {w} unsupported in {bits!r}: use 2..8, or 16 for float")
    if not (4 <= a <= 8 or a == 16):
        raise SlmquantError(f"activation bits {a} unsupported in {bits!r}: use 4..8, or 16 for float")
    return w, a


def _grouped(x: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """View x as (..., rows, reduce) for the spec's granularity."""
    if spec.granularity == "tensor":
        return x.reshape(1, -1)
    if spec.granularity == "group":
        if x.shape[-1] % spec.group_size:
            raise SlmquantError(f"group_size {spec.group_size} does not divide the width {x.shape[-1]}")
        return x.reshape(*x.shape[:-1], x.shape[-1] // spec.group_size, spec.group_size)
    return x


def qparams(x: torch.Tensor, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) for x, each shaped to broadcast over `_grouped(x, spec)` (reduced dim kept as 1)."""
    xg = _grouped(x, spec)
    if spec.sym:
        amax = xg.abs().amax(-1, keepdim=True) * spec.clip_ratio
        scale = amax / (spec.qmax + 0.5 if spec.full_grid else spec.qmax)
        zero = torch.zeros_like(scale)
    else:
        xmin = xg.amin(-1, keepdim=True).clamp(max=0) * spec.clip_ratio    # widened to include 0
        xmax = xg.amax(-1, keepdim=True).clamp(min=0) * spec.clip_ratio
        scale = (xmax - xmin) / spec.qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-xmin / scale)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))           # all-zero rows
    return scale, zero


def quantize(x: torch.Tensor, spec: QSpec, scale=None, zero=None):
    """x: any shape -> (q: int tensor of x's grouped shape, scale, zero). Pure."""
    if scale is None:
        scale, zero = qparams(x, spec)
    q = torch.clamp(_round(_grouped(x, spec) / scale) + zero, spec.qmin, spec.qmax)
    return q.to(torch.int8 if spec.sym or spec.bits < 8 else torch.uint8), scale, zero


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape, dtype=torch.float32):
    """Inverse of quantize: (q - zero) * scale, reshaped to `shape`."""
    return ((q.to(scale.dtype) - zero) * scale).reshape(shape).to(dtype)


def _round(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x)      # round half to even; the one rounding call of every method


def fake_quant(x: torch.Tensor, spec: QSpec | None, scale=None, zero=None) -> torch.Tensor:
    """x -> dequantize(quantize(x)): the same shape and dtype, values on the quantization grid.
    Computed in float32 at least (bf16 scales would move the grid). None: returned unchanged."""
    if spec is None:
        return x
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if scale is None:
        scale, zero = qparams(xf, spec)
    q = torch.clamp(_round(_grouped(xf, spec) / scale) + zero, spec.qmin, spec.qmax)
    return ((q - zero) * scale).reshape(x.shape).to(x.dtype)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round forward, identity backward (straight-through estimator) for methods that train."""
    return (_round(x) - x).detach() + x


def fake_quant_ste(x: torch.Tensor, spec: QSpec | None) -> torch.Tensor:
    """fake_quant (dynamic scales) with straight-through rounding, for training: the forward equals
    fake_quant's; gradients reach x directly and through the range. x: any shape -> same shape."""
    if spec is None:
        return x
    scale, zero = qparams(x, spec)
    q = torch.clamp(round_ste(_grouped(x, spec) / scale) + zero, spec.qmin, spec.qmax)
    return ((q - zero) * scale).reshape(x.shape)


def lwc_qparams(W: torch.Tensor, spec: QSpec, gamma: torch.Tensor, beta: torch.Tensor | None):
    """(scale, zero) of learnable weight clipping (below), shaped to broadcast over `_grouped(W, spec)`;
    differentiable in gamma and beta through the scale."""
    Wg = _grouped(W, spec)
    up = torch.sigmoid(gamma).reshape(*Wg.shape[:-1], 1)
    if spec.sym:
        scale = (Wg.abs().amax(-1, keepdim=True) * up / (spec.qmax + 0.5 if spec.full_grid else spec.qmax))
        return scale.clamp(1e-5, 1e4), torch.zeros((), dtype=W.dtype, device=W.device)
    low = torch.sigmoid(beta).reshape(*Wg.shape[:-1], 1)
    xmax, xmin = Wg.amax(-1, keepdim=True) * up, Wg.amin(-1, keepdim=True) * low
    scale = ((xmax - xmin) / spec.qmax).clamp(1e-5, 1e4)
    return scale, torch.round(-xmin / scale).clamp(0, spec.qmax).detach()


def lwc_fake_quant(W: torch.Tensor, spec: QSpec, gamma: torch.Tensor, beta: torch.Tensor | None) -> torch.Tensor:
    """Learnable weight clipping (OmniQuant, arXiv 2308.13137): each row's (or group's) range is
    shrunk by sigmoid factors before rounding, rounding straight-through, so that gamma, beta and W
    get gradients. W: (out, in); gamma, beta: (out,) or (out * in / group_size,) logits.
    Asymmetric: max' = sigmoid(gamma) max, min' = sigmoid(beta) min, scale = (max' - min') / qmax,
    zero = round(-min' / scale), kept in [0, qmax] (no gradient, as in the reference code).
    Symmetric: max|W|' = sigmoid(gamma) max|W| on the grid of `spec` (beta unused)."""
    Wg = _grouped(W, spec)                                   # (out, in) or (out, groups, group_size)
    scale, zero = lwc_qparams(W, spec, gamma, beta)
    q = torch.clamp(round_ste(Wg / scale) + zero, spec.qmin, spec.qmax)
    return ((q - zero) * scale).reshape(W.shape)


class QLinear(nn.Module):
    """A linear layer with fake-quantized weights (quantized once, at construction) and input
    activations quantized on the fly (per token, dynamic) when a_spec is given.
    x: (..., in_features) -> (..., out_features).
    g_idx (buffer, group weights only, optional): the group of each input channel, where groups are
    not runs of consecutive channels (GPTQ with act_order, groups in rounding order).
    had: the input is first rotated online by the fast Hadamard transform of this width (SpinQuant's
    R4, whose offline half is in the weights); `prepare_input` is what the weights see."""

    def __init__(self, in_features: int, out_features: int, bias: bool, w_spec: QSpec | None,
                 a_spec: QSpec | None, dtype=torch.float32, device=None, g_idx: bool = False,
                 had: int | None = None):
        super().__init__()
        if had is not None and had != in_features:
            raise SlmquantError(f"an online Hadamard of width {had} on a linear of {in_features} inputs")
        self.had = had
        if g_idx and (w_spec is None or w_spec.granularity != "group"):
            raise SlmquantError(f"a group index needs a group-wise weight spec, got {w_spec}")
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, device=device)
                             if g_idx else None)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        self.w_spec, self.a_spec = w_spec, a_spec

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, w_spec: QSpec | None, a_spec: QSpec | None,
                    weight: torch.Tensor | None = None, g_idx: torch.Tensor | None = None) -> "QLinear":
        """Quantize `weight` (default: linear.weight) with w_spec; `weight` may come already rounded
        (GPTQ) and then w_spec only describes it, with `g_idx` its channels' groups if not consecutive.
        An online Hadamard of `linear` (a QLinear) is kept."""
        if g_idx is not None and weight is None:
            raise SlmquantError("a group index describes weights rounded elsewhere: pass them as `weight`")
        W = linear.weight if weight is None else weight
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, w_spec, a_spec,
                dtype=linear.weight.dtype, device=linear.weight.device, g_idx=g_idx is not None,
                had=getattr(linear, "had", None))
        q.weight.copy_(fake_quant(W, w_spec) if weight is None else W)
        if g_idx is not None:
            q.g_idx.copy_(g_idx)
        if linear.bias is not None:
            q.bias.copy_(linear.bias)
        return q

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.had is None else fht(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_quant(self.prepare_input(x), self.a_spec), self.weight, self.bias)

    def meta(self) -> dict:
        """What is needed to rebuild this module around a saved state dict."""
        from dataclasses import asdict
        return {"type": "QLinear", "in": self.in_features, "out": self.out_features,
                "bias": self.bias is not None,
                "w_spec": asdict(self.w_spec) if self.w_spec else None,
                "a_spec": asdict(self.a_spec) if self.a_spec else None,
                **({"g_idx": True} if self.g_idx is not None else {}),
                **({"had": self.had} if self.had is not None else {})}

    @classmethod
    def from_meta(cls, meta: dict, dtype=torch.float32, device=None) -> "QLinear":
        spec = lambda d: QSpec(**d) if d else None
        return cls(meta["in"], meta["out"], meta["bias"], spec(meta["w_spec"]), spec(meta["a_spec"]),
                   dtype=dtype, device=device, g_idx=meta.get("g_idx", False), had=meta.get("had"))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                f"W={self.w_spec or 'float'}, A={self.a_spec or 'float'}"
                + (f", online Hadamard {self.had}" if self.had is not None else ""))
