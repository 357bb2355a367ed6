"""Does a calibrating method care how its calibration tokens are cut into windows? The same tokens
(the quick profile's N random windows of 2048) are recut into windows of L tokens, so only the
position structure changes (each window restarts at position 0: L / 2048 times as many first
positions, and as many more attention-sink tokens); the method runs on both and each result is
scored on the quick profile's first 40 windows of 2048. Not cached: a diagnostic, not a cell.

    .venv/bin/python scripts/calib_recut.py smollm2-135m gptq w4a16 [--set sym=false] \
        [--samples 32 --seqlen 2048] --recut 512 [--recut 2048] [--out F.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from slmquant import data, evaluate
from slmquant.methods import make_config, quantize
from slmquant.models import load_model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("method")
    p.add_argument("bits")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--recut", type=int, action="append", required=True, help="window length to recut into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    fmodel, tok = load_model(args.model)
    tokens = evaluate.wikitext2_tokens(tok)
    base = data.calib_windows(tok, args.samples, args.seqlen, args.seed)
    settings = dict(kv.split("=", 1) for kv in args.set)
    result = {"model": args.model, "method": args.method, "bits": args.bits, "settings": settings,
              "calib": f"{args.samples} x {args.seqlen}, seed {args.seed}", "runs": {}}
    for L in args.recut:
        if args.seqlen % L:
            raise SystemExit(f"--recut {L} does not divide --seqlen {args.seqlen}")
        calib = base.reshape(-1, L)
        cfg = make_config(args.method, args.bits, {**settings, "calib_samples": str(calib.shape[0]),
                                                    "calib_seqlen": str(L)})
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = quantize(copy.deepcopy(fmodel), args.method, cfg, calib)
        quant_s = time.perf_counter() - t0
        r = evaluate.perplexity(model, tokens, limit=evaluate.QUICK_WINDOWS)
        result["runs"][str(L)] = {"windows": list(calib.shape), "ppl_40": r.ppl, "ppl_20": r.ppl_of_first(20),
                                  "quant_s": quant_s}
        print(f"{args.method} {args.bits} {settings} on {calib.shape[0]} x {L} (recut): ppl40 {r.ppl:.3f} "
              f"(quantized in {quant_s:.0f} s)", flush=True)
        del model
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
