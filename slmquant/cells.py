"""A cell is one model x method x settings; this module builds it (timing the quantization) and
keeps it in an on-disk cache that pytest-xdist workers and CLI runs share: a file lock per cell,
atomic writes, a key hashing the model source, every setting and the quantizer's code, and a sha256
checked on every read, so that a corrupt or stale entry is rebuilt, never trusted."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import transformers
from filelock import FileLock, Timeout
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file as st_save_file

from . import codes, cost, data
from .arch import arch_map, set_submodule
from .attn import AttnInputQuant
from .errors import SlmquantError
from .files import atomic_path, write_text_atomic
from .methods import CalibConfig, QuantConfig, get_method
from .models import _sha256, cache_dir, device_name
from .quant import QLinear
from .rotation import untie_embeddings_

# Free disk space a cell write must leave behind (GiB): below it, the least recently used entries are
# evicted first, and if that is not enough the cell is returned uncached, with a warning, rather than
# filling the disk that the rest of the run (and everything else on the machine) needs.
RESERVE_ENV = "SLMQUANT_CACHE_RESERVE_GB"
RESERVE_GB = 4.0

# The code that draws calibration windows (build() calls it, not the method): part of every cell key.
CALIB_CODE = hashlib.sha256(Path(data.__file__).read_bytes()).hexdigest()[:16]
SHORT_NAMES = {"smollm2-135m": "smollm2", "qwen2.5-0.5b": "qwen2"}
MODULE_TYPES = {"QLinear": QLinear,        # modules a method may install, rebuilt from their meta()
                "AttnInputQuant": AttnInputQuant}


@dataclass(frozen=True)
class Cell:
    model: str
    method: str
    cfg: QuantConfig

    @property
    def id(self) -> str:
        parts = [SHORT_NAMES.get(self.model, self.model.replace("/", "_").replace(":", "_")), self.method, self.cfg.scheme]
        parts += [f"{k}={v}" for k, v in sorted(self.cfg.settings().items())]
        return "-".join(parts)

    def key(self, source_key: str) -> str:
        payload = {"source": source_key, "method": self.method, "cfg": asdict(self.cfg),
                   "cfg_class": type(self.cfg).__name__, "code": get_method(self.method).source_hash(),
                   "calib_code": CALIB_CODE, "torch": torch.__version__,
                   "transformers": transformers.__version__, "device": device_name()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def build(cell: Cell, float_model: nn.Module, tok) -> tuple[nn.Module, dict]:
    """Quantize a deep copy of the float model; the record holds the cost (track 3)."""
    method = get_method(cell.method)
    model = copy.deepcopy(float_model)
    device = str(next(model.parameters()).device)

    def run():
        calib = None
        if isinstance(cell.cfg, CalibConfig):
            calib = data.calib_windows(tok, cell.cfg.calib_samples, cell.cfg.calib_seqlen, cell.cfg.seed)
        return method.fn(model, calib, cell.cfg)

    model, c = cost.measure(run, device, _state_bytes(float_model))
    info = getattr(model, "slmquant_method_info", None)
    c = cost.charge_shared(c, (info or {}).get("shared_cost"), _state_bytes(float_model))
    record = {"cell": cell.id, "model": cell.model, "method": cell.method, "bits": cell.cfg.scheme,
              "settings": asdict(cell.cfg), "source": getattr(float_model, "slmquant_source").to_dict(),
              "cost": c.to_dict(), "threads": torch.get_num_threads(),
              "calib_budget": ({"samples": cell.cfg.calib_samples, "seqlen": cell.cfg.calib_seqlen}
                               if isinstance(cell.cfg, CalibConfig) else None),
              "method_info": info}
    return model, record


class CellCache:
    """get(cell, float_model, tok) -> (model, record, built): from disk when a valid entry exists."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else cache_dir() / "cells"
        self.root.mkdir(parents=True, exist_ok=True)

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.safetensors", self.root / f"{key}.json"

    def get(self, cell: Cell, float_model: nn.Module, tok):
        key = cell.key(float_model.slmquant_source.key)
        with FileLock(str(self.root / f"{key}.lock")):
            loaded = self._load(key, float_model)
            if loaded is not None:
                os.utime(self.paths(key)[1])          # last use, for prune()
                return (*loaded, False)
            model, record = build(cell, float_model, tok)
            if self.make_room(_state_bytes(model), keep=key):
                self._save(key, model, record, float_model)
            else:
                warnings.warn(f"cell {cell.id} is not cached: {self.root} has "
                              f"{shutil.disk_usage(self.root).free / 2**30:.1f} GiB free, under the "
                              f"{_reserve_bytes() / 2**30:.1f} GiB reserve ({RESERVE_ENV}) even with every "
                              "other entry evicted", stacklevel=2)
            with open(self.root / "builds.log", "a") as f:
                f.write(f"{time.time():.3f} {os.getpid()} {cell.id} {key}\n")
            return model, record, True

    def entries(self) -> list[dict]:
        """Every complete entry: key, cell id, size in bytes, last use (meta file mtime)."""
        out = []
        for meta in self.root.glob("*.json"):
            weights = meta.with_suffix(".safetensors")
            try:
                cell = json.loads(meta.read_text())["record"]["cell"]
            except (OSError, ValueError, KeyError):
                cell = None
            size = meta.stat().st_size + (weights.stat().st_size if weights.is_file() else 0)
            out.append({"key": meta.stem, "cell": cell, "bytes": size, "last_used": meta.stat().st_mtime})
        return sorted(out, key=lambda e: e["last_used"], reverse=True)

    def prune(self, max_bytes: int) -> list[dict]:
        """Remove the least recently used entries until the cache holds at most max_bytes; stale
        entries (from older code or settings) are never used again, so they go first in time."""
        removed, total = [], 0
        for e in self.entries():
            total += e["bytes"]
            if total > max_bytes:
                self._remove(e["key"])
                removed.append(e)
        return removed

    def make_room(self, nbytes: int, keep: str | None = None) -> bool:
        """Evict least recently used entries (never `keep`) until writing nbytes leaves the reserve
        free on the cache's disk; False if even an empty cache would not leave it."""
        reserve = _reserve_bytes()

        def enough(extra: int = 0) -> bool:
            return shutil.disk_usage(self.root).free + extra - nbytes >= reserve
        entries = [e for e in self.entries() if e["key"] != keep]
        if not enough(sum(e["bytes"] for e in entries)):
            return False                              # evicting would lose entries and still not do
        for e in reversed(entries):
            if enough():
                return True
            if not self._remove(e["key"], wait=False):
                continue                              # in use by another worker (which may wait on us)
            warnings.warn(f"cell cache: evicted {e['cell']} ({e['bytes'] / 2**20:.0f} MiB) to keep "
                          f"{reserve / 2**30:.1f} GiB of disk free", stacklevel=3)
        return enough()

    def _remove(self, key: str, wait: bool = True) -> bool:
        try:
            with FileLock(str(self.root / f"{key}.lock"), timeout=-1 if wait else 0):
                for p in self.paths(key):
                    p.unlink(missing_ok=True)
        except Timeout:
            return False
        return True

    def record(self, cell: Cell, source_key: str) -> dict | None:
        """The stored record of a cell (its cost), without loading the model; None if absent."""
        try:
            return json.loads(self.paths(cell.key(source_key))[1].read_text())["record"]
        except (OSError, ValueError, KeyError):
            return None

    def _save(self, key: str, model: nn.Module, record: dict, float_model: nn.Module) -> None:
        weights, meta = self.paths(key)
        tensors, modules = cell_tensors(model, float_model)
        with atomic_path(weights) as tmp:
            st_save_file(tensors, str(tmp))
            entry = {"format": FORMAT, "record": record, "modules": modules, "sha256": _sha256(tmp),
                     "size": tmp.stat().st_size}
        # the meta file, written last, marks the entry complete
        write_text_atomic(meta, json.dumps(entry, indent=1, default=str))

    def _load(self, key: str, float_model: nn.Module):
        weights, meta = self.paths(key)
        if not (weights.is_file() and meta.is_file()):
            return None
        try:
            entry = json.loads(meta.read_text())
            if entry.get("format") != FORMAT:
                raise ValueError("older cache format")
            if weights.stat().st_size != entry["size"] or _sha256(weights) != entry["sha256"]:
                raise ValueError("checksum mismatch")
            device = next(float_model.parameters()).device
            model = apply_cell_tensors(float_model, st_load_file(str(weights), device=str(device)), entry["modules"])
        except (ValueError, KeyError, OSError, RuntimeError, SlmquantError):
            weights.unlink(missing_ok=True)   # corrupt or stale: rebuilt by the caller, never trusted
            meta.unlink(missing_ok=True)
            return None
        return model, entry["record"]


FORMAT = 2      # 2: QLinear weights as codes + per-group value tables; only tensors that differ from float


@torch.no_grad()
def cell_tensors(model: nn.Module, float_model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """What a cell stores: each installed module's meta and its weights as integer codes with the
    value of each code per group (exact, slmquant.codes; raw where not on a grid), its bias and
    group index, and every other tensor that differs from the float model's. Tensors the float
    model already has unchanged (embeddings, the LM head, untouched norms) are not stored."""
    tensors, modules = {}, {}
    for name, m in model.named_modules():
        if type(m).__name__ not in MODULE_TYPES:
            continue
        modules[name] = meta = m.meta()
        if not hasattr(m, "weight"):
            continue                                  # no tensors (AttnInputQuant)
        try:
            enc = codes.encode(m.weight, m.w_spec, m.g_idx) if m.w_spec is not None else None
        except SlmquantError:
            enc = None
        if enc is not None:
            meta["encoded"] = True
            tensors.update({f"{name}.weight.{k}": v for k, v in enc.items()})
        else:
            tensors[f"{name}.weight"] = m.weight.detach().clone()
        for b in ("bias", "g_idx"):
            if getattr(m, b, None) is not None:
                tensors[f"{name}.{b}"] = getattr(m, b).detach().clone()
    ref = float_model.state_dict()
    for k, v in model.state_dict().items():
        if k.rsplit(".", 1)[0] in modules:
            continue
        if k in ref and ref[k].shape == v.shape and torch.equal(ref[k], v):
            continue
        tensors[k] = v.detach().clone()
    return {k: v.contiguous() for k, v in tensors.items()}, modules


@torch.no_grad()
def apply_cell_tensors(float_model: nn.Module, tensors: dict[str, torch.Tensor], modules: dict[str, dict]) -> nn.Module:
    """A copy of the float model with a cell's stored modules and tensors put in; every stored
    tensor must be used."""
    model = copy.deepcopy(float_model)
    dtype, device = float_model.dtype, next(float_model.parameters()).device
    used = set()
    for name, meta in modules.items():
        m = MODULE_TYPES[meta["type"]].from_meta(meta, dtype=dtype, device=device)
        if not hasattr(m, "weight"):
            set_submodule(model, name, m)
            m.after_install(model)
            continue
        if m.g_idx is not None:
            m.g_idx.copy_(tensors[f"{name}.g_idx"])
            used.add(f"{name}.g_idx")
        if meta.get("encoded"):
            prefix = f"{name}.weight."
            enc = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            m.weight.copy_(codes.decode(enc, m.w_spec, m.in_features, m.g_idx, dtype))
            used.update(prefix + k for k in enc)
        else:
            m.weight.copy_(tensors[f"{name}.weight"])
            used.add(f"{name}.weight")
        if m.bias is not None:
            m.bias.copy_(tensors[f"{name}.bias"])
            used.add(f"{name}.bias")
        set_submodule(model, name, m)
    rest = {k: v for k, v in tensors.items() if k not in used}
    if f"{arch_map(model).lm_head}.weight" in rest:
        untie_embeddings_(model)                  # the cell untied them (rotations): one copy each
    state = model.state_dict()
    for k, v in rest.items():
        if k not in state or state[k].shape != v.shape:
            raise SlmquantError(f"cell tensor {k} does not fit the model")
        state[k].copy_(v)
    return model


def _reserve_bytes() -> int:
    raw = os.environ.get(RESERVE_ENV, RESERVE_GB)
    try:
        return int(float(raw) * 2**30)
    except ValueError:
        raise SlmquantError(f"{RESERVE_ENV}={raw!r}: expected a number of GiB") from None


def _state_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors, each storage once (tied embeddings are one tensor)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()}
    return sum(storages.values())
