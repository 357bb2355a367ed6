"""How close a bundled stand-in's weights already sit to a 4-bit grid: the relative weight error
(sum of squared errors over sum of squared weights, every decoder linear) of slmquant's own W4 RTN
grids, and of a min + scale * q grid with a float offset per block (the GGUF Q4_1 layout). The
stand-ins were rounded to GGUF block grids of 32 before they reached us, so a group size that
divides 32 can look far better on them than on the paper's checkpoints.

    .venv/bin/python scripts/grid_alignment.py [smollm2-135m]
"""
from __future__ import annotations

import sys

import torch

from slmquant.arch import decoder_layers
from slmquant.models import load_model
from slmquant.quant import QSpec, fake_quant


def float_offset_grid(W: torch.Tensor, group: int, bits: int = 4) -> torch.Tensor:
    """Asymmetric min/max rounding per group with an unrounded offset: min + scale * q."""
    G = W.reshape(-1, group)
    lo, hi = G.amin(1, keepdim=True), G.amax(1, keepdim=True)
    s = ((hi - lo) / (2**bits - 1)).clamp_min(1e-12)
    return (torch.round((G - lo) / s) * s + lo).reshape(W.shape)


def main() -> int:
    model, _ = load_model(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m")
    weights = [m.weight.detach().double() for m in decoder_layers(model).modules()
               if isinstance(m, torch.nn.Linear)]
    den = sum(W.pow(2).sum().item() for W in weights)
    grids = {f"slmquant W4 {'sym' if sym else 'asym'} {'per channel' if g is None else f'g{g}'}":
             (lambda W, s=QSpec(4, sym, "channel" if g is None else "group", g): fake_quant(W, s))
             for sym in (True, False) for g in (None, 64, 32)}
    grids |= {f"min + scale*q, g{g} (Q4_1 layout)": (lambda W, g=g: float_offset_grid(W, g)) for g in (64, 32)}
    print("| grid | relative weight error |\n|---|---|")
    for name, fn in grids.items():
        err = sum((fn(W) - W).pow(2).sum().item() for W in weights)
        print(f"| {name} | {err / den:.3e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
