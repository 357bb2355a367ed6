"""Does GPTQ's layer objective carry over to tokens it was not calibrated on? For the chosen decoder
layers of the float model, every linear (q/k/v and gate/up share one input) is rounded by RTN and by
GPTQ variants against the Hessian of its calibration inputs; each variant's output error
tr((W - Q) H (W - Q)^T) is printed relative to RTN's, on the calibration Hessian and on the Hessian of
held-out windows drawn with another seed. Also checks the rounding's numerics: the same GPTQ run in
float64 (`--float64`) must give the same objective as float32.

    .venv/bin/python scripts/heldout_layer_error.py qwen2.5-0.5b --layers 0,1,2,3 \
        [--calib 128 --heldout 32 --seqlen 512] [--set group_size=64] [--float64]

Cost: one pass of the calibration and held-out windows through the layers up to the last one
chosen, plus a few seconds of GPTQ per linear and variant.
"""
from __future__ import annotations

import argparse
import sys

import torch

from slmquant import data
from slmquant.arch import decoder_layers
from slmquant.calib import capture_layer_inputs, run_layer
from slmquant.methods import make_config
from slmquant.methods.gptq import _collect, _sequential_groups, gptq_weight
from slmquant.models import load_model
from slmquant.quant import fake_quant

VARIANTS = {
    "act-order, static groups": {"act_order": True},
    "no act-order": {"act_order": False},
    "act-order, groups in rounding order": {"act_order": True, "static_groups": False},
    "act-order, damp 0.1": {"act_order": True, "damp": 0.1},
}


def output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T) in float64: the GPTQ objective up to the factor 2/N."""
    E = (W - Q).double()
    return float(torch.einsum("ij,jk,ik->", E, H.double(), E))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--layers", default="0,1,2,3")
    p.add_argument("--calib", type=int, default=128, help="calibration windows (seed 0)")
    p.add_argument("--heldout", type=int, default=32, help="held-out windows (seed 12345)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--bits", default="w4a16")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--float64", action="store_true", help="also run each variant in float64")
    args = p.parse_args()

    cfg = make_config("gptq", args.bits, dict(kv.split("=", 1) for kv in args.set))
    spec, want = cfg.w_spec, sorted(int(x) for x in args.layers.split(","))
    model, tok = load_model(args.model)
    names = _sequential_groups(model, true_sequential=False)[0]        # every decoder linear
    sets = {k: capture_layer_inputs(model, data.calib_windows(tok, n, args.seqlen, seed))
            for k, n, seed in (("calib", args.calib, 0), ("heldout", args.heldout, 12345))}
    xs = {k: s.hidden for k, s in sets.items()}
    totals: dict[str, list[float]] = {}
    print(f"| layer | linear(s) | {' | '.join(VARIANTS)} |  (GPTQ / RTN output error: calibration, held-out)")
    print("|---|---|" + "---|" * len(VARIANTS))
    for i, layer in enumerate(decoder_layers(model)):
        if i > want[-1]:
            break
        if i in want:
            mods = {n: layer.get_submodule(n) for n in names}
            hess = {k: {} for k in xs}
            for k in xs:
                _collect(layer, mods, xs[k], sets[k].layer_kwargs[i], hess[k])
            shared: dict[int, list[str]] = {}
            for n in mods:
                shared.setdefault(id(hess["calib"][n]), []).append(n)
            for group in shared.values():
                W = torch.cat([mods[n].weight for n in group]).detach().float()
                Hc, Hh = hess["calib"][group[0]]["H"], hess["heldout"][group[0]]["H"]
                R = fake_quant(W, spec)
                rtn = (output_error(W, R, Hc), output_error(W, R, Hh))
                cells = []
                for tag, kw in VARIANTS.items():
                    Q = gptq_weight(W, Hc, spec, cfg.block_size, **{"damp": cfg.damp, **kw}).weight
                    err = (output_error(W, Q, Hc), output_error(W, Q, Hh))
                    cell = f"{err[0] / rtn[0]:.3f}, {err[1] / rtn[1]:.3f}"
                    if args.float64:
                        Q64 = gptq_weight(W.double(), Hc.double(), spec, cfg.block_size,
                                          **{"damp": cfg.damp, **kw}).weight
                        cell += f" (f64 {output_error(W, Q64.float(), Hc) / rtn[0]:.3f})"
                    cells.append(cell)
                    t = totals.setdefault(tag, [0.0, 0.0, 0.0, 0.0])
                    t[0] += err[0]; t[1] += rtn[0]; t[2] += err[1]; t[3] += rtn[1]
                print(f"| {i} | {'+'.join(n.split('.')[-1] for n in group)} | {' | '.join(cells)} |", flush=True)
        xs = {k: run_layer(layer, xs[k], sets[k].layer_kwargs[i]) for k in xs}
    print("| all | sum | " + " | ".join(f"{a / b:.3f}, {c / d:.3f}" for a, b, c, d in totals.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
