"""Integer codes of fake-quantized weights: grid recovery, 4-bit packing, and the exact compact form
in which the cell cache stores a QLinear's weights.

A cell's QLinear keeps its weights dequantized, on the grid of its weight spec. `grid_of` recovers
the integer codes from those values exactly (it searches the scale for which every value of a row
or group is an integer multiple, within the spec's range) and refuses weights that are not on such
a grid. Real models (slmquant.real) compute with those codes; the cell cache (slmquant.cells) stores
them with a per-group table of the float32 value of each code (`encode` / `decode`), which gives
the weights back bit for bit, whatever float rounding produced them."""
from __future__ import annotations

import torch

from .errors import SlmquantError
from .quant import QSpec

GRID_RTOL = 1e-3           # |W / s - round(W / s)| allowed when recovering a grid (float32 products)


def _groups(W: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """(out, n_groups, group width) view of a weight for the spec's granularity."""
    if spec.granularity == "group":
        if W.shape[1] % spec.group_size:
            raise SlmquantError(f"group_size {spec.group_size} does not divide the width {W.shape[1]}")
        return W.reshape(W.shape[0], -1, spec.group_size)
    if spec.granularity in ("channel", "token"):
        return W.unsqueeze(1)
    raise SlmquantError(f"weights on a per-{spec.granularity} grid are not supported by real models")


@torch.no_grad()
def grid_of(W: torch.Tensor, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes u (uint8, W's shape, in [0, 2^bits - 1]), scale (float32, (out, n_groups)) and zero
    (int16, (out, n_groups)) with W == (u - zero) * scale, for a weight already on a `spec` grid.

    The step of a row or group is span / k (span: max |W| for symmetric grids, max - min for
    asymmetric ones) for the quantizer's own k when the extreme code is used (RTN), else for the
    first k in 1..2^bits - 1 that makes every value an integer number of steps: a multiple of the
    quantizer's step that represents the same values exactly (GPTQ may leave extreme codes unused)."""
    Wg = _groups(W.detach().to(torch.float64), spec)
    levels = 2 ** spec.bits - 1
    lo = Wg.amin(-1, keepdim=True)
    span = Wg.abs().amax(-1, keepdim=True) if spec.sym else Wg.amax(-1, keepdim=True) - lo
    flat = span == 0                                   # an all-constant group: one step of |value|
    scale = torch.where(flat, torch.where(lo.abs() > 0, lo.abs(), torch.ones_like(lo)), torch.zeros_like(lo))

    def integral(vals, s):
        r = vals / s
        return ((r - r.round()).abs() <= GRID_RTOL).all(-1, keepdim=True)

    first = spec.qmax if spec.sym else levels
    s = torch.where(flat, torch.ones_like(span), span / first)
    scale = torch.where(~flat & integral(Wg, s), s, scale)
    todo = (scale == 0).squeeze(-1)
    if todo.any():
        sub, sub_span = Wg[todo], span[todo]
        found = _from_smallest_gap(sub, sub_span, levels, integral)
        for k in range(1, levels + 1):
            if (found > 0).all():
                break
            s = sub_span / k
            found = torch.where((found == 0) & integral(sub, s), s, found)
        scale[todo] = found
    if (scale == 0).any():
        raise SlmquantError(f"{int((scale == 0).sum())} weight group(s) are not on a {spec} grid: "
                            "not a quantized weight")
    steps = (Wg / scale).round()
    zero = torch.full_like(lo, 2 ** (spec.bits - 1)) if spec.sym else -steps.amin(-1, keepdim=True)
    u = steps + zero
    if u.min() < 0 or u.max() > levels:
        raise SlmquantError(f"recovered codes outside 0..{levels}: not a {spec} grid")
    back = ((u - zero) * scale).reshape(W.shape)
    if not torch.allclose(back, W.double(), rtol=0, atol=1e-6 * float(W.abs().max().clamp(min=1e-30))):
        raise SlmquantError(f"weights do not reproduce from the recovered {spec} grid")
    return u.reshape(W.shape).to(torch.uint8), scale.squeeze(-1).float(), zero.squeeze(-1).to(torch.int16)


def _from_smallest_gap(Wg: torch.Tensor, span: torch.Tensor, levels: int, integral) -> torch.Tensor:
    """The step of each group whose smallest gap between distinct values is one step: span / k0
    with k0 = round(span / gap), where that k0 <= levels makes every value integral; 0 elsewhere.
    No k < k0 can: its step exceeds the gap, which would then be a fraction of a step. So this is
    the first k of grid_of's search, found without the search (which still runs for the rest)."""
    v = Wg.sort(-1).values
    gap = v.diff(dim=-1)
    gap = torch.where(gap > span * 1e-6, gap, torch.full_like(gap, float("inf"))).amin(-1, keepdim=True)
    k0 = (span / gap).round()
    ok = torch.isfinite(gap) & (k0 >= 1) & (k0 <= levels)
    k0 = torch.where(ok, k0, torch.ones_like(k0))
    s = span / k0
    return torch.where(ok & integral(Wg, s), s, torch.zeros_like(s))


def pack4(u: torch.Tensor) -> torch.Tensor:
    """uint8 codes in 0..15, (out, in) with in even -> (out, in / 2): low nibble first."""
    if u.shape[-1] % 2:
        raise SlmquantError(f"4-bit packing needs an even width, got {u.shape[-1]}")
    return (u[..., 0::2] | (u[..., 1::2] << 4)).to(torch.uint8)


def unpack4(p: torch.Tensor) -> torch.Tensor:
    return torch.stack((p & 0x0F, p >> 4), dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


def _group_of_columns(n_in: int, spec: QSpec, g_idx: torch.Tensor | None, device) -> torch.Tensor:
    """Each input column's group (long, (n_in,))."""
    if g_idx is not None:
        return g_idx.long().to(device)
    if spec.granularity == "group":
        return torch.arange(n_in, device=device) // spec.group_size
    return torch.zeros(n_in, dtype=torch.long, device=device)


@torch.no_grad()
def grid_of_groups(W: torch.Tensor, spec: QSpec, g_idx: torch.Tensor | None = None):
    """grid_of for weights whose groups are given by g_idx where not consecutive (their channels
    gathered, recovered, put back): codes (W's shape), scale and zero ((out, n_groups), group ids)."""
    if g_idx is None:
        return grid_of(W, spec)
    order = torch.argsort(g_idx, stable=True)
    u, scale, zero = grid_of(W[:, order], spec)
    return u[:, torch.argsort(order)], scale, zero


@torch.no_grad()
def encode(W: torch.Tensor, spec: QSpec, g_idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The compact exact form of weights on a grid: "codes" (uint8, 4-bit packed two a byte where
    the width is even), "scale" (float32) and "zero" (int16) per row and group, and the few values
    that (codes - zero) * scale in float32 does not give back bit for bit ("fix_index", flat
    positions, and "fix_value"), or, where those would take more room, "table": the value of each
    code per row and group. Raises SlmquantError if W is not on the grid."""
    u, scale, zero = grid_of_groups(W, spec, g_idx)
    packed = spec.bits <= 4 and W.shape[1] % 2 == 0
    out = {"codes": pack4(u) if packed else u, "scale": scale, "zero": zero}
    approx = _affine(u, scale, zero, spec, g_idx).to(W.dtype)
    wrong = (approx != W).flatten().nonzero().squeeze(1)
    levels = 2 ** spec.bits
    if wrong.numel() * 12 > W.shape[0] * scale.shape[1] * levels * W.element_size():
        group = _group_of_columns(W.shape[1], spec, g_idx, W.device)
        flat = group[None, :] * levels + u.long()
        table = torch.zeros(W.shape[0], scale.shape[1] * levels, dtype=W.dtype, device=W.device)
        out = {"codes": out["codes"], "table": table.scatter_(1, flat, W)}
    else:
        out.update(fix_index=wrong, fix_value=W.flatten()[wrong])
    if not torch.equal(decode(out, spec, W.shape[1], g_idx, W.dtype), W):
        raise SlmquantError("weights are not reproduced bit for bit by their codes")
    return out


def _affine(u: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QSpec, g_idx) -> torch.Tensor:
    group = _group_of_columns(u.shape[1], spec, g_idx, u.device)
    return (u.float() - zero[:, group].float()) * scale[:, group]


def decode(enc: dict[str, torch.Tensor], spec: QSpec, n_in: int, g_idx: torch.Tensor | None = None,
           dtype=torch.float32) -> torch.Tensor:
    """The weights back from `encode`'s form."""
    u = enc["codes"]
    if u.shape[1] != n_in:
        u = unpack4(u)
    if "table" in enc:
        group = _group_of_columns(n_in, spec, g_idx, u.device)
        return enc["table"].gather(1, group[None, :] * 2 ** spec.bits + u.long()).to(dtype)
    W = _affine(u, enc["scale"], enc["zero"], spec, g_idx).to(dtype)
    W.view(-1)[enc["fix_index"]] = enc["fix_value"].to(dtype)
    return W
