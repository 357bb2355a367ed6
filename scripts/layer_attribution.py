"""Which decoder layers does a quantized cell's damage come from? For each layer l, the float model
with only layer l taken from the cell is scored (perplexity ratio to float and mean KL of the logits
against float) on a few WikiText-2 test windows. Two cells side by side show where one method beats
the other (for example GPTQ against RTN at the same weight settings).

    .venv/bin/python scripts/layer_attribution.py smollm2-135m rtn:w4a16 gptq:w4a16 \
        [--set calib_samples=16 --set calib_seqlen=512] [--windows 4 --seqlen 512] [--out F.json]

Cells come from the cell cache (built when missing). Cost: one scoring of the windows per layer
per cell, plus the float reference.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from slmquant import evaluate
from slmquant.arch import decoder_layers
from slmquant.cells import Cell, CellCache
from slmquant.methods import make_config
from slmquant.models import load_model


@torch.no_grad()
def score(model, windows: torch.Tensor, ref_logp: list[torch.Tensor] | None):
    """(perplexity, mean KL(float || model) per position, log-probs) over `windows` (n, T); the
    log-probs are kept only for the reference pass (ref_logp None)."""
    nll, n_tok, kl, logps = 0.0, 0, 0.0, []
    for j, ids in enumerate(windows):
        logp = model(ids[None], use_cache=False).logits.float()[0].log_softmax(-1)
        nll -= logp[:-1].gather(1, ids[1:, None]).sum().item()
        n_tok += ids.numel() - 1
        if ref_logp is not None:
            kl += F.kl_div(logp, ref_logp[j], log_target=True, reduction="sum").item() / ids.numel()
        else:
            logps.append(logp)
    return float(torch.exp(torch.tensor(nll / n_tok))), kl / len(windows), logps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("cells", nargs="+", help="METHOD:BITS, for example gptq:w4a16")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every cell whose config has the field")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    fmodel, tok = load_model(args.model)
    tokens = evaluate.wikitext2_tokens(tok)
    windows = tokens[: args.windows * args.seqlen].view(args.windows, args.seqlen)
    ppl0, _, ref = score(fmodel, windows, None)
    print(f"float ppl {ppl0:.4f} ({args.windows} x {args.seqlen} tokens)", flush=True)

    overrides = dict(kv.split("=", 1) for kv in args.set)
    cache, result = CellCache(), {"model": args.model, "float_ppl": ppl0, "windows": args.windows,
                                   "seqlen": args.seqlen, "cells": {}}
    qlayers = {}
    for spec in args.cells:
        method, bits = spec.split(":")
        names = {f.name for f in dataclasses.fields(make_config(method, bits, {}))}
        cfg = make_config(method, bits, {k: v for k, v in overrides.items() if k in names})
        cell = Cell(args.model, method, cfg)
        qmodel, _, _ = cache.get(cell, fmodel, tok)
        whole, whole_kl, _ = score(qmodel, windows, ref)
        print(f"{cell.id}: whole model ppl x{whole / ppl0:.4f}, KL {whole_kl:.4f}", flush=True)
        qlayers[cell.id] = decoder_layers(qmodel)
        result["cells"][cell.id] = {"whole": {"ratio": whole / ppl0, "kl": whole_kl}, "layers": []}

    layers = decoder_layers(fmodel)
    ids = list(qlayers)
    print("layer | " + " | ".join(f"{c} ratio, KL" for c in ids))
    for l in range(len(layers)):
        row = []
        for cid in ids:
            saved = layers[l]                                 # the float model, with layer l swapped
            layers[l] = qlayers[cid][l]
            try:
                ppl, kl, _ = score(fmodel, windows, ref)
            finally:
                layers[l] = saved
            result["cells"][cid]["layers"].append({"ratio": ppl / ppl0, "kl": kl})
            row.append(f"x{ppl / ppl0:.4f}, {kl:.4f}")
        print(f"{l} | " + " | ".join(row), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
