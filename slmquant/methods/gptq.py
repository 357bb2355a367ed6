"""gptq: Hessian-based weight rounding (GPTQ, arXiv 2210.17323), layer by layer on the partly
quantized model. For each linear, H = 2/N sum x x^T over its calibration inputs; the columns of W
are rounded one at a time and the rounding error of each is spread over the columns not yet rounded
through the inverse Hessian (its upper Cholesky factor), in lazy blocks of `block_size` columns.

Settings as the paper and its reference code: block 128, damping 0.01 of the mean diagonal, dead
inputs (zero diagonal) zeroed, optional activation order (columns by decreasing diagonal). Groups:
a group's scale is taken when the algorithm reaches its first column, from the weights as updated so
far (exactly: including the pending updates of the current block, where the reference code reads
weights that lack them when a group starts inside a block). With act_order, groups are either
fixed up front on the original column order ("static groups": every group covers consecutive input
channels, an ordinary group-quantized model), or consecutive in the rounding order (the reference
code's default), each input channel's group then recorded as `g_idx` for storage.

Also the weight step of other methods: `gptq_(model, calib, cfg, a_spec)` rounds every decoder
linear and installs QLinears that quantize their inputs with `a_spec`."""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..arch import arch_map, decoder_layers
from ..calib import accumulate_hessian, input_hooks, make_hessian, walk_layers
from ..errors import SlmquantError
from ..quant import QLinear, QSpec, _grouped, fake_quant, qparams
from . import CalibConfig, register


@dataclass(frozen=True)
class GPTQConfig(CalibConfig):
    """block_size: columns per lazy-update block (paper: 128).
    damp: fraction of the mean Hessian diagonal added to the diagonal (paper: 0.01).
    act_order: round columns by decreasing Hessian diagonal. On by default: the outlier input
    channels of small LMs (q_proj's Hessian diagonal spans 300x on SmolLM2) make it decisive
    (measured in the README).
    true_sequential: within a layer, collect each linear's Hessian after the linears before it
    (q/k/v, then o, then gate/up, then down) are rounded; off: one calibration pass per layer.
    static_groups: with act_order and groups, fix every group's scale up front on the original
    column order (each group: consecutive input channels). Off: groups are consecutive in the
    rounding order, each taking its scale when reached (the reference code's default), and the
    QLinear records each input channel's group (`g_idx`).
    full_grid: on by default, as in the reference code: symmetric weights on all 2^bits levels. On
    held-out windows at W4A16 it cut GPTQ's KL from float by 12% (SmolLM2) and 14% (Qwen2.5-0.5B)
    (docs/full_grid.md); RTN keeps 15 levels (the full grid hurt it on SmolLM2).
    w_clip: each row's (or group's) weight range from the reference quantizer's clipping search
    (`mse_qparams`) instead of its min/max; off by default (the GPTQ paper's setting), on in
    SpinQuant's evaluation scripts (`--w_clip`)."""
    full_grid: bool = True
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True
    true_sequential: bool = False
    static_groups: bool = True
    w_clip: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.block_size < 1:
            raise SlmquantError(f"block_size must be positive, got {self.block_size}")
        if not 0 <= self.damp < 1:
            raise SlmquantError(f"damp must be in [0, 1), got {self.damp}")


SUITE = (("w8a8", {}), ("w4a8", {}), ("w4a8", {"sym": False}),
         ("w4a16", {}), ("w4a16", {"sym": False}), ("w4a16", {"group_size": 64}))


class Rounded(NamedTuple):
    """weight: rounded and dequantized, the input's dtype. loss: the proxy loss
    sum_rows sum_cols (w - q)^2 / [H^-1]_cc^2 / 2. g_idx: each input column's group (int32), where
    groups are not consecutive input channels (act_order without static groups), else None."""
    weight: torch.Tensor
    loss: float
    g_idx: torch.Tensor | None


def mse_qparams(x: torch.Tensor, spec: QSpec, grid: int = 100, maxshrink: float = 0.8,
                norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) as `qparams` gives them, with each row's (or group's) range shrunk by the
    factor, among 1, 1 - 1/grid, ..., 1 - (maxshrink * grid - 1) / grid (80 candidates: 1.00 down to
    0.21), that rounds it with the least sum |Q(x) - x|^norm: the weight-clipping search of the GPTQ
    reference code's quantizer. The factor multiplies spec.clip_ratio; a tie keeps the wider range.
    Searched in float32 at least, as the reference. Its grid is this spec's: asymmetric weights (the
    SpinQuant default here) as the reference's; symmetric ones follow `full_grid`."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    scale = zero = best = None
    for i in range(int(maxshrink * grid)):
        s, z = qparams(x, dataclasses.replace(spec, clip_ratio=spec.clip_ratio * (1 - i / grid)))
        err = _grouped((fake_quant(x, spec, s, z) - x).abs().pow(norm), spec).sum(-1, keepdim=True)
        if best is None:
            scale, zero, best = s, z, err
            continue
        better = err < best
        scale, zero, best = torch.where(better, s, scale), torch.where(better, z, zero), torch.where(better, err, best)
    return scale, zero


@torch.no_grad()
def gptq_weight(W: torch.Tensor, H: torch.Tensor, spec: QSpec | None, block_size: int = 128,
                damp: float = 0.01, act_order: bool = False, static_groups: bool = True,
                w_clip: bool = False, params: tuple[torch.Tensor, torch.Tensor] | None = None) -> Rounded:
    """Round W (out, in) against the Hessian H (in, in) of its inputs.
    spec None rounds nothing (the identity): the error feedback then has nothing to spread.
    w_clip: every row's (group's) range from `mse_qparams`, on the weights as GPTQ reaches them.
    params: every row's (scale, zero), each (out, 1), fixed by the caller (per-channel specs only:
    ranges learned by another method, OmniQuant's clipping)."""
    dt = torch.float64 if W.dtype == torch.float64 else torch.float32       # at least float32
    W0, W = W, W.detach().clone().to(dt)
    H = H.detach().clone().to(dt)
    n_in = W.shape[1]
    if spec is not None and spec.granularity == "group" and n_in % spec.group_size:
        raise SlmquantError(f"group_size {spec.group_size} does not divide the width {n_in}")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    group = spec.group_size if spec is not None and spec.granularity == "group" else None
    col_spec = dataclasses.replace(spec, granularity="channel", group_size=None) if spec else None
    find = mse_qparams if w_clip else qparams
    if params is not None and (spec is None or group is not None):
        raise SlmquantError("fixed (scale, zero) per row need a per-channel weight spec")
    static = None
    if spec is not None and group is None:
        static = params if params is not None else find(W, col_spec)   # one (scale, zero) per row
    elif group is not None and act_order and static_groups:             # fixed up front, original order
        static = [find(W[:, g:g + group], col_spec) for g in range(0, n_in, group)]

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n_in)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(n_in, dtype=H.dtype, device=H.device)
    # the upper Cholesky factor of H^-1: row c holds what rounding column c does to the later columns
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    # The column loop works on the transpose of each block (W1t: one contiguous row per column),
    # so that reading a column and the rank-one update of the columns after it touch contiguous
    # memory; the arithmetic is the same products and differences, so the result is bit for bit
    # the same as on columns. Err1 and the lazy batch update keep W's layout.
    Qt = torch.empty(n_in, W.shape[0], dtype=W.dtype, device=W.device)
    loss = torch.zeros((), dtype=torch.float64)
    params = static if group is None else None
    with _one_thread():
        for b0 in range(0, n_in, block_size):
            b1 = min(b0 + block_size, n_in)
            W1t, Hinv1 = W[:, b0:b1].t().contiguous(), Hinv[b0:b1, b0:b1]
            Err1 = torch.zeros(W.shape[0], b1 - b0, dtype=W.dtype, device=W.device)
            for i in range(b1 - b0):
                c = b0 + i                                              # position in rounding order
                w, d = W1t[i], Hinv1[i, i]
                if spec is None:
                    q = w
                else:
                    if group is not None:
                        if static is not None:
                            params = static[int(perm[c]) // group]
                        elif c % group == 0:                            # consecutive in rounding order
                            params = find(_current(W, W1t, Err1, Hinv, b0, b1, i, group), col_spec)
                    q = fake_quant(w[:, None], col_spec, *params)[:, 0]
                Qt[c] = q
                err = (w - q) / d
                W1t[i:] -= Hinv1[i, i:][:, None] * err[None, :]
                Err1[:, i] = err
            loss += Err1.double().pow(2).sum() / 2                      # (w - q)^2 / d^2 / 2, per block
            W[:, b1:] -= Err1 @ Hinv[b0:b1, b1:]                         # the lazy batch update
    inv = torch.argsort(perm)
    g_idx = None
    if group is not None and act_order and not static_groups:
        g_idx = (inv // group).to(torch.int32)                         # rounding position // group
    return Rounded(Qt.t()[:, inv].to(W0.dtype), float(loss), g_idx)


@contextmanager
def _one_thread():
    """The column loop is thousands of small tensor ops: a thread pool only adds synchronisation
    (4x slower with a second process on the two cores, measured), so it runs on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _current(W, W1t, Err1, Hinv, b0: int, b1: int, i: int, n: int) -> torch.Tensor:
    """Columns c..c+n (c = b0 + i) as they stand now: those inside the block from W1t (the block,
    transposed), those past it from W plus the block's pending lazy update, so that results do not
    depend on the block size."""
    cur = W1t[i:i + n].t()
    ahead = n - cur.shape[1]
    if ahead > 0:
        cur = torch.cat([cur, W[:, b1:b1 + ahead] - Err1[:, :i] @ Hinv[b0:b0 + i, b1:b1 + ahead]], 1)
    return cur


def _sequential_groups(model: nn.Module, true_sequential: bool) -> list[tuple[str, ...]]:
    amap = arch_map(model)
    steps = [amap.attn_in.linears, amap.v_o.linears, amap.mlp_in.linears, amap.up_down.linears]
    return steps if true_sequential else [tuple(n for s in steps for n in s)]


@torch.no_grad()
def gptq_(model: nn.Module, calib: torch.Tensor, cfg: GPTQConfig, a_spec: QSpec | None,
          progress: bool = True) -> dict[str, float]:
    """Round every decoder linear of `model` with GPTQ, in place, and install QLinears that quantize
    their inputs with a_spec. Layer by layer: each layer's inputs come from the earlier layers
    already quantized; only one layer's Hessians are held at a time. Returns the proxy loss of
    each linear."""
    if calib is None:
        raise SlmquantError("gptq needs calibration windows")
    losses: dict[str, float] = {}
    bar = tqdm(total=len(decoder_layers(model)), desc="gptq", unit="layer", disable=not progress)

    def quantize_layer(i: int, layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict) -> None:
        for names in _sequential_groups(model, cfg.true_sequential):
            mods = {n: layer.get_submodule(n) for n in names}
            hess: dict[str, dict] = {}
            _collect(layer, mods, inputs, kwargs, hess)
            # rows round independently given H: linears sharing a Hessian are rounded as one matrix
            shared: dict[int, list[str]] = {}
            for n in mods:
                shared.setdefault(id(hess[n]), []).append(n)
            for names_h in shared.values():
                W = torch.cat([mods[n].weight for n in names_h])
                r = gptq_weight(W, hess[names_h[0]]["H"], cfg.w_spec, cfg.block_size, cfg.damp,
                                cfg.act_order, cfg.static_groups, w_clip=cfg.w_clip)
                losses[f"{i}." + "+".join(names_h)] = r.loss
                for n, q in zip(names_h, r.weight.split([mods[n].out_features for n in names_h])):
                    layer.set_submodule(n, QLinear.from_linear(mods[n], cfg.w_spec, a_spec, weight=q,
                                                               g_idx=r.g_idx))
            del hess
        bar.update(1)

    walk_layers(model, calib, quantize_layer)
    bar.close()
    return losses


def _collect(layer: nn.Module, mods: dict[str, nn.Module], inputs, kwargs, hess: dict) -> None:
    """Run the layer on every calibration window, accumulating each linear's input Hessian. Linears
    fed by the same tensor (q/k/v after one norm) get the Hessian computed once and shared."""
    seen: dict[int, tuple[str, torch.Tensor]] = {}   # holding x keeps its id from being reused

    def collect(name: str, x: torch.Tensor) -> None:
        if id(x) in seen and seen[id(x)][0] != name:   # the same input tensor as an earlier linear
            hess.setdefault(name, hess[seen[id(x)][0]])
            return
        seen[id(x)] = (name, x)
        accumulate_hessian(hess.setdefault(name, make_hessian(x.shape[-1], x.device)), x)

    with input_hooks(mods, collect):
        for x in inputs:
            seen.clear()
            layer(x, **kwargs)


@register("gptq", GPTQConfig, suite=SUITE)
@torch.no_grad()
def gptq(model: nn.Module, calib: torch.Tensor, cfg: GPTQConfig) -> nn.Module:
    gptq_(model, calib, cfg, cfg.a_spec)
    return model
