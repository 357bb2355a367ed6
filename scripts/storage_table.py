"""Storage of real low-bit cells against the float16 checkpoint (tied weights counted once), with the
embeddings kept in float16 and with int8 embeddings (and so the tied LM head), and the packing bound.

    .venv/bin/python scripts/storage_table.py [--model smollm2-135m] [--cells rtn:w8a8,rtn:w4a8]

Reads the cells from the cell cache (builds them if absent); times nothing."""
from __future__ import annotations

import argparse
import copy

from slmquant.cells import Cell, CellCache
from slmquant.methods import make_config
from slmquant.models import load_model
from slmquant.real import storage, to_real


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--cells", default="rtn:w8a8,rtn:w4a8")
    args = p.parse_args()
    model, tok = load_model(args.model)
    f16 = storage(model)
    n_emb = model.get_input_embeddings().weight.numel()
    n_rest = sum(p.numel() for p in model.parameters()) - n_emb
    print(f"{args.model}: float16 checkpoint {f16['bytes']:,} bytes ({f16['embedding_bytes']:,} embeddings)")
    print("| cell | embeddings | bytes | x float16 | packing bound | x float16 without embeddings |")
    print("|---|---|---|---|---|---|")
    for spec in args.cells.split(","):
        method, bits = spec.split(":")
        cell = Cell(args.model, method, make_config(method, bits))
        qmodel = CellCache().get(cell, model, tok)[0]
        wbytes = int(bits[1]) / 8
        for emb in ("float16", "int8"):
            s = storage(to_real(copy.deepcopy(qmodel), embeddings=emb))
            bound = ((2 if emb == "float16" else 1) * n_emb + wbytes * n_rest) / f16["bytes"]
            print(f"| {cell.id} | {emb} | {s['bytes']:,} | {s['bytes'] / f16['bytes']:.4f} | {bound:.4f} | "
                  f"{s['bytes_without_embeddings'] / f16['bytes_without_embeddings']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
