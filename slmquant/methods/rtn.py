"""rtn: round-to-nearest, the control every method must beat. Weights symmetric per output channel
(asymmetric and grouped by option), activations symmetric per token, dynamic. No calibration."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..arch import layer_linears, set_submodule
from ..quant import QLinear
from . import QuantConfig, register


@dataclass(frozen=True)
class RTNConfig(QuantConfig):
    """Round-to-nearest has no settings of its own beyond QuantConfig's."""


SUITE = (("w8a8", {}), ("w4a8", {}), ("w4a8", {"sym": False}),
         ("w4a16", {}), ("w4a16", {"sym": False}), ("w4a16", {"group_size": 64}))


@register("rtn", RTNConfig, suite=SUITE)
@torch.no_grad()
def rtn(model: nn.Module, calib, cfg: QuantConfig) -> nn.Module:
    """Replace every decoder-layer linear by a QLinear (embeddings and the LM head stay float)."""
    for name, linear in layer_linears(model):
        if isinstance(linear, QLinear):          # weights already rounded by an earlier step (GPTQ)
            linear.a_spec = cfg.a_spec
        else:
            set_submodule(model, name, QLinear.from_linear(linear, cfg.w_spec, cfg.a_spec))
    return model
