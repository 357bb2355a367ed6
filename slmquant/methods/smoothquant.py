"""smoothquant: migrate activation outliers into the weights with per-channel scales (SmoothQuant,
arXiv 2211.10438), then round with RTN. Weights and activations symmetric, as in the paper.

Steps: calibrate (per-channel max|X| at the inputs of q/k/v, gate/up and o) -> smooth (fold s into
the preceding norm or v_proj, multiply it into the following linears) -> quantize (rtn).
Departure: the v -> o smoothing is GQA-aware: one factor per kv channel, shared by the query heads
of its group. Options: a per-layer alpha search on the layer output error, and GPTQ weights."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..arch import arch_map, decoder_layers, heads, kv_max, kv_to_q
from ..calib import act_absmax, input_hooks, run_layer, walk_layers
from ..errors import SlmquantError
from ..quant import QLinear
from . import CalibConfig, register
from .gptq import GPTQConfig, gptq_
from .rtn import rtn


@dataclass(frozen=True)
class SmoothQuantConfig(CalibConfig):
    """alpha: migration strength α in s_j = max|X_j|^α / max|W_j|^(1-α) (paper: 0.5 for most models).
    alpha_search: instead pick α per decoder layer from ALPHA_GRID, the one whose smoothed and
    quantized layer reproduces the float layer's output best on `search_samples` calibration windows.
    smooth_vo: also smooth v_proj -> o_proj. weights: "rtn" or "gptq" (GPTQ's defaults: block 128,
    damping 0.01) rounds the smoothed weights. Calibration: 512 windows of 512 tokens (the paper's)."""
    alpha: float = 0.5
    alpha_search: bool = False
    search_samples: int = 4
    smooth_vo: bool = True
    weights: str = "rtn"
    calib_samples: int = 512
    calib_seqlen: int = 512

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.alpha <= 1:
            raise SlmquantError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.weights not in ("rtn", "gptq"):
            raise SlmquantError(f"weights must be rtn or gptq, got {self.weights!r}")
        if self.search_samples < 1:
            raise SlmquantError(f"search_samples must be positive, got {self.search_samples}")


ALPHA_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


SUITE = (("w8a8", {}), ("w4a8", {}), ("w8a8", {"alpha_search": True}), ("w4a8", {"alpha_search": True}),
         ("w4a8", {"alpha_search": True, "weights": "gptq"}))


def smoothing_scales(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), computed in float64, guarded against zeros."""
    x_max, w_max = x_max.double().clamp(min=1e-5), w_max.double().clamp(min=1e-5)
    return (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)     # s_j


@torch.no_grad()
def smooth_norm_(norm: nn.Module, linears: list[nn.Linear], s: torch.Tensor, offset: float) -> None:
    """norm(x) / s feeds linears whose input columns are multiplied by s: the product is unchanged.
    Gemma's norm multiplies by (1 + w): the new w is (1 + w) / s - 1."""
    w = norm.weight.double()
    norm.weight.copy_(((offset + w) / s - offset).to(norm.weight.dtype))
    for lin in linears:
        lin.weight.copy_((lin.weight.double() * s).to(lin.weight.dtype))          # W[:, j] * s_j


@torch.no_grad()
def smooth_vo_(v: nn.Linear, o: nn.Linear, s_kv: torch.Tensor, hq: tuple[int, int, int]) -> None:
    """Divide v's output channels by s (one factor per kv channel) and multiply o's input columns
    by the same factor for every query head of the group: attention is linear in v."""
    v.weight.copy_((v.weight.double() / s_kv[:, None]).to(v.weight.dtype))
    if v.bias is not None:
        v.bias.copy_((v.bias.double() / s_kv).to(v.bias.dtype))
    o.weight.copy_((o.weight.double() * kv_to_q(s_kv, hq)).to(o.weight.dtype))


@torch.no_grad()
def collect_act_max(model: nn.Module, windows: torch.Tensor, progress: bool = True) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| of the first linear of each balance group (q and gate share their
    norm's output with k, v and up) and of o_proj, over every calibration token."""
    amap, stats = arch_map(model), {}
    targets = {}
    for i, layer in enumerate(decoder_layers(model)):
        for b in (amap.attn_in, amap.mlp_in, amap.v_o):
            targets[f"{i}.{b.linears[0]}"] = layer.get_submodule(b.linears[0])
    device = next(model.parameters()).device
    with input_hooks(targets, lambda n, x: act_absmax(stats, n, x)):
        for w in tqdm(windows, desc="smoothquant: activation maxima", unit="window", disable=not progress):
            model(w[None].to(device), use_cache=False)
    return stats


@torch.no_grad()
def smooth_layer_(layer: nn.Module, i: int, act_max: dict[str, torch.Tensor], alpha: float, amap, hq: tuple,
                  smooth_vo: bool = True) -> None:
    """Smooth one decoder layer in place (its float output is unchanged)."""
    for b in (amap.attn_in, amap.mlp_in):
        lins = [layer.get_submodule(n) for n in b.linears]
        w_max = torch.stack([l.weight.abs().amax(0) for l in lins]).amax(0)       # max over rows
        s = smoothing_scales(act_max[f"{i}.{b.linears[0]}"], w_max, alpha)
        smooth_norm_(layer.get_submodule(b.prev), lins, s, b.prev_offset)
    if smooth_vo:
        v, o = layer.get_submodule(amap.v_o.prev), layer.get_submodule(amap.v_o.linears[0])
        x_max = kv_max(act_max[f"{i}.{amap.v_o.linears[0]}"], hq)
        w_max = kv_max(o.weight.abs().amax(0), hq)
        smooth_vo_(v, o, smoothing_scales(x_max, w_max, alpha), hq)


@torch.no_grad()
def smooth_(model: nn.Module, act_max: dict[str, torch.Tensor], alpha: float, smooth_vo: bool = True) -> nn.Module:
    """Apply SmoothQuant's equivalent transformation in place (the float output is unchanged)."""
    amap, hq = arch_map(model), heads(model)
    for i, layer in enumerate(decoder_layers(model)):
        smooth_layer_(layer, i, act_max, alpha, amap, hq, smooth_vo)
    return model


def _rtn_layer_(layer: nn.Module, names, cfg) -> nn.Module:
    for n in names:
        layer.set_submodule(n, QLinear.from_linear(layer.get_submodule(n), cfg.w_spec, cfg.a_spec))
    return layer


@torch.no_grad()
def search_alpha_(model: nn.Module, calib: torch.Tensor, act_max: dict[str, torch.Tensor],
                  cfg: SmoothQuantConfig, grid=ALPHA_GRID, progress: bool = True) -> dict[int, dict[float, float]]:
    """Per decoder layer, in order: smooth a copy with each alpha of the grid, quantize it (RTN, the
    cell's bits), and keep the alpha whose output is closest (squared error) to the float layer's on
    the same inputs; then smooth the layer with it. Inputs come from the earlier layers smoothed
    (and, with RTN weights, quantized) already. Returns {layer: {alpha: error}}."""
    amap, hq, errors = arch_map(model), heads(model), {}
    windows = calib[:cfg.search_samples]
    bar = tqdm(total=len(decoder_layers(model)), desc="smoothquant: alpha search", unit="layer",
               disable=not progress)

    def fn(i, layer, x, kw):
        ref = run_layer(layer, x, kw)
        errs = {}
        for a in grid:
            trial = copy.deepcopy(layer)
            smooth_layer_(trial, i, act_max, a, amap, hq, cfg.smooth_vo)
            _rtn_layer_(trial, amap.linears, cfg)
            errs[a] = sum(float((y - r).double().pow(2).sum()) for y, r in zip(run_layer(trial, x, kw), ref))
        errors[i] = errs
        smooth_layer_(layer, i, act_max, min(errs, key=errs.get), amap, hq, cfg.smooth_vo)
        if cfg.weights == "rtn":
            _rtn_layer_(layer, amap.linears, cfg)
        bar.update(1)

    walk_layers(model, windows, fn)
    bar.close()
    return errors


@register("smoothquant", SmoothQuantConfig, suite=SUITE)
@torch.no_grad()
def smoothquant(model: nn.Module, calib: torch.Tensor, cfg: SmoothQuantConfig) -> nn.Module:
    act_max = collect_act_max(model, calib)
    info = {}
    if cfg.alpha_search:
        errors = search_alpha_(model, calib, act_max, cfg)
        info["alpha"] = {i: min(e, key=e.get) for i, e in errors.items()}
    else:
        smooth_(model, act_max, cfg.alpha, cfg.smooth_vo)
    if cfg.weights == "gptq":
        gcfg = GPTQConfig(w_bits=cfg.w_bits, a_bits=cfg.a_bits, group_size=cfg.group_size, sym=cfg.sym,
                          full_grid=cfg.full_grid,
                          a_sym=cfg.a_sym, calib_samples=cfg.calib_samples, calib_seqlen=cfg.calib_seqlen,
                          seed=cfg.seed)
        gptq_(model, calib, gcfg, cfg.a_spec)
    else:
        rtn(model, None, cfg)          # layers already quantized by the search keep their weights
    model.slmquant_method_info = info
    return model
