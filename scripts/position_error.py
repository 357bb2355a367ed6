"""Where in a window does a quantized cell lose? The increase of the per-token NLL over the float
model, averaged over position buckets of the quick profile's 2048-token windows, for each cell. A
method that fits the bulk of the calibration tokens but not the first positions of a window (whose
keys and values every later token reads) shows up here as a loss at the start that spreads.

    .venv/bin/python scripts/position_error.py smollm2-135m rtn:w4a16 gptq:w4a16 \
        gptq:w4a16:calib_samples=128,calib_seqlen=512 [--windows 4] [--out F.json]

Cells take the quick profile's calibration unless set (METHOD:BITS[:K=V,...], as quick_table.py);
they come from the cell cache (built when missing). Cost: one pass over the windows per cell.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from slmquant import evaluate
from slmquant.cells import Cell, CellCache
from slmquant.methods import make_config
from slmquant.models import load_model
from slmquant.profiles import profile_settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quick_table import parse_cell  # noqa: E402

BUCKETS = ((1, 4), (4, 16), (16, 64), (64, 256), (256, 1024), (1024, 2048))   # predicted positions


@torch.no_grad()
def token_nll(model, windows: torch.Tensor) -> torch.Tensor:
    """NLL of each predicted token, (n, T - 1): entry t scores token t + 1 from tokens 0..t."""
    out = []
    for ids in windows:
        logp = model(ids[None], use_cache=False).logits.float()[0].log_softmax(-1)
        out.append(-logp[:-1].gather(1, ids[1:, None])[:, 0])
    return torch.stack(out)


def bucket_means(d: torch.Tensor) -> list[float]:
    """Mean over windows and over the predicted positions p (1-based: token p) of each bucket."""
    return [d[:, a - 1:min(b, d.shape[1] + 1) - 1].mean().item() for a, b in BUCKETS]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("cells", nargs="+", help="METHOD:BITS[:K=V,...], for example gptq:w4a16:sym=false")
    p.add_argument("--windows", type=int, default=4, help="the first N windows of 2048 tokens")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    fmodel, tok = load_model(args.model)
    tokens = evaluate.wikitext2_tokens(tok)
    seqlen = evaluate.SEQLEN
    windows = tokens[: args.windows * seqlen].view(args.windows, seqlen)
    ref = token_nll(fmodel, windows)
    heads = [f"{a}-{b - 1}" for a, b in BUCKETS]
    print(f"float ppl {ref.mean().exp():.3f} on {args.windows} x {seqlen} tokens; NLL by position:",
          " ".join(f"{h}: {v:.3f}" for h, v in zip(heads, bucket_means(ref))), flush=True)
    result = {"model": args.model, "windows": args.windows, "seqlen": seqlen, "buckets": heads,
              "float": {"ppl": ref.mean().exp().item(), "nll": bucket_means(ref)}, "cells": {}}
    cache = CellCache()
    print("| cell | ppl | gap closed vs first | " + " | ".join(f"dNLL {h}" for h in heads) + " |")
    print("|---|---|---|" + "---|" * len(heads))
    first_ppl = None
    for spec in args.cells:
        method, bits, settings = parse_cell(spec)
        cell = Cell(args.model, method, make_config(method, bits, {**profile_settings(method, "quick"), **settings}))
        torch.manual_seed(0)
        nll = token_nll(cache.get(cell, fmodel, tok)[0], windows)
        ppl, d = nll.mean().exp().item(), bucket_means(nll - ref)
        f = result["float"]["ppl"]
        first_ppl = first_ppl or ppl
        closed = (first_ppl - ppl) / (first_ppl - f) if first_ppl > f else float("nan")
        result["cells"][cell.id] = {"ppl": ppl, "dnll": d}
        print(f"| {cell.id} | {ppl:.3f} | {closed:.0%} | " + " | ".join(f"{v:+.3f}" for v in d) + " |", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
