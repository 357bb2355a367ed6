"""Quantized attention inputs: Q and K after RoPE and V, each rounded per (head, token) with an
activation spec before the attention product, as OmniQuant's reference code does (its attention
probabilities stay float); or, for SpinQuant, K and V only (its KV-cache quantization), after R3: a
Hadamard over head_dim applied online to Q and K after RoPE, which leaves Q K^T unchanged (H is
orthogonal) and spreads K's outlier channels before K is rounded. The attention modules of every architecture here (llama, qwen2,
gemma3_text) hand Q, K and V to the attention function their config names; `install` registers
one that rounds them for each attention module carrying an `AttnInputQuant` and then calls sdpa
(whose masks it also takes: Gemma 3's sliding-window mask depends on them), so a layer without one
is untouched. With a KV cache the cached keys and values are rounded again at each step: per-token
rounding on the grid is idempotent."""
from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn as nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .errors import SlmquantError
from .quant import QSpec, fake_quant, fake_quant_ste
from .rotation import fht

NAME = "slmquant_qkv"          # the attention function's registered name
CHILD = "qkv_quant"            # the AttnInputQuant's name under its attention module
INNER = "sdpa"                 # the attention the rounded inputs go to (the models' default here)


class AttnInputQuant(nn.Module):
    """Rounds an attention input (batch, heads, tokens, head_dim) per (head, token) with `spec`
    (None: no rounding), straight-through when gradients are on (training), plainly otherwise.
    q: Q is rounded too (OmniQuant), else K and V only (SpinQuant's KV cache). r3: Q and K first
    turn by the Hadamard of head_dim (SpinQuant's R3, normalized: orthogonal)."""

    def __init__(self, spec: QSpec | None, q: bool = True, r3: bool = False):
        super().__init__()
        if spec is not None and spec.granularity != "token":
            raise SlmquantError(f"attention inputs are rounded per token, got {spec.granularity}")
        self.spec, self.q, self.r3 = spec, q, r3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec is None:
            return x
        if not torch.is_grad_enabled():
            return fake_quant(x, self.spec)
        low = x.dtype in (torch.float16, torch.bfloat16)        # round in float32, as fake_quant does
        return fake_quant_ste(x.float() if low else x, self.spec).to(x.dtype)

    def qkv(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        """The attention inputs as the attention product reads them."""
        if self.r3:
            query, key = fht(query), fht(key)
        return (self(query) if self.q else query), self(key), self(value)

    def meta(self) -> dict:
        return {"type": "AttnInputQuant", "spec": asdict(self.spec) if self.spec else None,
                "q": self.q, "r3": self.r3}

    @classmethod
    def from_meta(cls, meta: dict, dtype=None, device=None) -> "AttnInputQuant":
        spec = meta["spec"]
        return cls(QSpec(**spec) if spec else None, q=meta.get("q", True), r3=meta.get("r3", False))

    def after_install(self, model: nn.Module) -> None:
        """Point the model at the rounding attention function (the config is the whole model's)."""
        model.config._attn_implementation = NAME

    def extra_repr(self) -> str:
        return f"{'QKV' if self.q else 'KV'}={self.spec}" + (", R3" if self.r3 else "")


def _attention(module, query, key, value, attention_mask, **kwargs):
    q = getattr(module, CHILD, None)
    if q is not None:
        query, key, value = q.qkv(query, key, value)
    return ALL_ATTENTION_FUNCTIONS[INNER](module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(NAME, _attention)
AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS[INNER])


def install(model: nn.Module, attn: nn.Module, spec: QSpec | None, q: bool = True, r3: bool = False) -> AttnInputQuant:
    """Give one attention module rounded (and with r3, turned) inputs from now on (the model's other
    attention modules keep theirs until they get their own)."""
    if model.config._attn_implementation not in (INNER, NAME):
        raise SlmquantError(f"attention implementation {model.config._attn_implementation!r}: rounded "
                            f"attention inputs need {INNER}")
    mod = AttnInputQuant(spec, q=q, r3=r3)
    setattr(attn, CHILD, mod)
    mod.after_install(model)
    return mod
