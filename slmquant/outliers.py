"""Per-layer outlier statistics of a float model (the outlier story of the SLMQuant paper's Figure 3,
on the models we have): how far the largest weight and the largest activation channel stand out
from the rest, at every linear input of every decoder layer.

- weights: per linear, max |w| / RMS(w) (a Gaussian matrix of this size gives about 4-5; a few huge
  weights give far more);
- activations: per linear input (the four points a W?A8 method quantizes: attention input, o_proj
  input, MLP input, down_proj input), the absolute maximum of each channel over the calibration
  tokens, then max / median over channels (per-channel outliers, what SmoothQuant migrates) and the
  absolute maximum itself (what a per-token 8-bit scale must cover).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .arch import arch_map, decoder_layers

# linear input points: name -> the linear whose input it is (one per distinct input)
POINTS = {"attn_in": "self_attn.q_proj", "o_in": "self_attn.o_proj", "mlp_in": "mlp.gate_proj",
          "down_in": "mlp.down_proj"}


def weight_peak_to_rms(w: torch.Tensor) -> float:
    w = w.detach().double()
    return float(w.abs().max() / w.pow(2).mean().sqrt())


def channel_ratio(absmax: torch.Tensor) -> float:
    """max / median of per-channel absolute maxima (1 when every channel peaks alike)."""
    a = absmax.double()
    return float(a.max() / a.median().clamp_min(1e-12))


@torch.no_grad()
def layer_outliers(model: nn.Module, windows: torch.Tensor) -> list[dict]:
    """One dict per decoder layer: {"layer", "weight": {linear: peak/RMS}, "act_ratio": {point:
    max/median channel}, "act_max": {point: absolute max}} over the calibration `windows` (N, T)."""
    amap, layers = arch_map(model), decoder_layers(model)
    absmax: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []

    def hook(key):
        def fn(_module, args):
            x = args[0].detach().abs().flatten(0, -2).amax(0).float()
            absmax[key] = torch.maximum(absmax[key], x) if key in absmax else x
        return fn

    for i, layer in enumerate(layers):
        for point, lin in POINTS.items():
            hooks.append(layer.get_submodule(lin).register_forward_pre_hook(hook((i, point))))
    device = next(model.parameters()).device
    try:
        for w in windows:
            model(w[None].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for i, layer in enumerate(layers):
        out.append({"layer": i,
                    "weight": {n.split(".")[-1]: weight_peak_to_rms(layer.get_submodule(n).weight)
                               for n in amap.linears},
                    "act_ratio": {p: channel_ratio(absmax[(i, p)]) for p in POINTS},
                    "act_max": {p: float(absmax[(i, p)].max()) for p in POINTS}})
    return out
