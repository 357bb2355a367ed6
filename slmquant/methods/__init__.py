"""The method registry: a frozen config dataclass plus a registered `fn(model, calib, cfg) -> model`.
A new method is one new file in this folder: it registers itself on import."""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import pkgutil
import sys
import types
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import torch.nn as nn

from ..errors import SlmquantError
from ..quant import QSpec, parse_bits


@dataclass(frozen=True)
class QuantConfig:
    """Settings every method shares.

    w_bits / a_bits: weight and activation bits (16: left in floating point).
    group_size: weights quantized per group of this many input channels; None = per output channel.
    sym: symmetric weights (else asymmetric with a zero point). a_sym: symmetric activations.
    full_grid: symmetric weights on all 2^bits levels (scale max|w| / (2^(b-1) - 1/2), the GPTQ
    reference's grid) instead of 2^bits - 1 (scale max|w| / (2^(b-1) - 1)); see slmquant.quant."""
    w_bits: int = 8
    a_bits: int = 8
    group_size: int | None = None
    sym: bool = True
    a_sym: bool = True
    full_grid: bool = False

    def __post_init__(self):
        if not (2 <= self.w_bits <= 8 or self.w_bits == 16):
            raise SlmquantError(f"w_bits must be 2..8 or 16, got {self.w_bits}")
        if not (4 <= self.a_bits <= 8 or self.a_bits == 16):
            raise SlmquantError(f"a_bits must be 4..8 or 16, got {self.a_bits}")
        if self.group_size is not None and self.group_size < 1:
            raise SlmquantError(f"group_size must be positive, got {self.group_size}")

    @property
    def scheme(self) -> str:
        return f"w{self.w_bits}a{self.a_bits}"

    @property
    def w_spec(self) -> QSpec | None:
        if self.w_bits == 16:
            return None
        return QSpec(self.w_bits, self.sym, "group" if self.group_size else "channel", self.group_size,
                     full_grid=self.full_grid and self.sym)

    @property
    def a_spec(self) -> QSpec | None:
        return None if self.a_bits == 16 else QSpec(self.a_bits, self.a_sym, "token")

    def settings(self) -> dict:
        """Every field that differs from the class default (the scheme aside): part of a cell's id."""
        out = {}
        for f in fields(self):
            if f.name in ("w_bits", "a_bits"):
                continue
            v = getattr(self, f.name)
            if v != f.default:
                out[f.name] = v
        return out


@dataclass(frozen=True)
class CalibConfig(QuantConfig):
    """QuantConfig plus a calibration budget, for the methods that calibrate.

    calib_samples / calib_seqlen: random windows x tokens of the calibration text (paper: 128 x 2048).
    seed: the seed that draws the windows."""
    calib_samples: int = 128
    calib_seqlen: int = 2048
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.calib_samples < 1 or self.calib_seqlen < 2:
            raise SlmquantError("calib_samples must be >= 1 and calib_seqlen >= 2")


@dataclass(frozen=True)
class Method:
    name: str
    config: type[QuantConfig]
    fn: Callable
    suite: tuple[tuple[str, dict], ...]    # the (bits, settings) cells of the regression suite

    def source_hash(self) -> str:
        """Hash of the method's file and of every slmquant module it uses, transitively (smoothquant
        calls rtn; everything uses quant.py and arch.py), so that a code change invalidates the
        cached cells it can affect and no others. Read once per process (when the methods are
        loaded): a file edited while a long run goes on must not key what the run's older code
        computes."""
        root = self.fn.__module__
        if root not in _SOURCE_HASHES:
            h = hashlib.sha256()
            for name in sorted(_module_closure(root)):
                h.update(name.encode())
                h.update(Path(sys.modules[name].__file__).read_bytes())
            _SOURCE_HASHES[root] = h.hexdigest()[:16]
        return _SOURCE_HASHES[root]


_SOURCE_HASHES: dict[str, str] = {}


def _module_closure(root: str) -> set[str]:
    """The slmquant modules that `root` reaches through its globals (imported modules, functions,
    classes), transitively."""
    seen, todo = set(), [root]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for v in vars(importlib.import_module(name)).values():
            dep = v.__name__ if isinstance(v, types.ModuleType) else getattr(v, "__module__", None)
            if isinstance(v, types.ModuleType) and dep.startswith(name + "."):
                continue        # a package's submodules are attributes of it, not its imports
            if isinstance(dep, str) and dep.split(".")[0] == "slmquant" and dep not in seen:
                todo.append(dep)
    return seen


METHODS: dict[str, Method] = {}


def register(name: str, config: type[QuantConfig], suite=()):
    """Register `fn(model, calib, cfg) -> model` under `name`; `suite` lists the (bits, settings)
    cells the regression suite runs for it, so a new method joins the matrix from its own file."""
    def deco(fn):
        METHODS[name] = Method(name, config, fn, tuple(suite))
        return fn
    return deco


def all_methods() -> dict[str, Method]:
    _load_all()
    return dict(sorted(METHODS.items()))


def _load_all() -> None:
    """Import every method module; the first time, also read every method's code hash, so that the
    hash is that of the code just imported even when a run first needs it hours later."""
    for mod in pkgutil.iter_modules([str(Path(__file__).parent)]):
        importlib.import_module(f"{__name__}.{mod.name}")
    if not _SOURCE_HASHES:
        for m in list(METHODS.values()):
            m.source_hash()


def get_method(name: str) -> Method:
    _load_all()
    if name not in METHODS:
        raise SlmquantError(f"unknown method {name!r}: registered methods are {', '.join(sorted(METHODS))}")
    return METHODS[name]


def _coerce(value: str, typ):
    text = value.strip()
    if text.lower() in ("none", "null"):
        return None
    if "bool" in str(typ):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise SlmquantError(f"expected true or false, got {value!r}")
    for cast in (int, float):
        if cast.__name__ in str(typ):
            try:
                return cast(text)
            except ValueError:
                continue
    if "str" in str(typ):
        return text
    raise SlmquantError(f"cannot read {value!r} as {typ}")


def make_config(method: str, bits: str, overrides: dict[str, str | object] | None = None) -> QuantConfig:
    """The method's config for `bits` ('w4a8'), with `key=value` overrides (strings are parsed by
    the field's type): every field is settable, unknown keys are refused with the list of fields."""
    m = get_method(method)
    w, a = parse_bits(bits)
    names = {f.name: f for f in fields(m.config)}
    kw: dict = {"w_bits": w, "a_bits": a}
    for k, v in (overrides or {}).items():
        if k not in names:
            raise SlmquantError(f"{method} has no setting {k!r}: settings are {', '.join(names)}")
        kw[k] = _coerce(v, names[k].type) if isinstance(v, str) else v
    return m.config(**kw)


def quantize(model: nn.Module, method: str, cfg: QuantConfig, calib=None) -> nn.Module:
    """Quantize `model` in place with a registered method and return it."""
    m = get_method(method)
    if not isinstance(cfg, m.config):
        raise SlmquantError(f"{method} takes a {m.config.__name__}, got {type(cfg).__name__}")
    return m.fn(model, calib, cfg)


__all__ = ["QuantConfig", "CalibConfig", "METHODS", "register", "get_method", "make_config", "quantize", "dataclasses"]
