"""Architectures as data: which norm feeds which linears, which linear feeds which, heads and GQA
groups, biases, tied embeddings and norm conventions, for llama, qwen2 and gemma3_text. Every
method reads this map; none has code per model."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .errors import SlmquantError


@dataclass(frozen=True)
class Balance:
    """`prev` feeds `linears` (a norm, or a linear whose output is their input). Channel scales can
    be folded into `prev` and undone in `linears`; `prev_offset` is the norm's weight offset
    (Gemma computes x_hat * (1 + weight))."""
    prev: str
    linears: tuple[str, ...]
    prev_offset: float = 0.0


@dataclass(frozen=True)
class ArchMap:
    model_type: str
    attn_in: Balance                     # input norm -> q/k/v
    mlp_in: Balance                      # pre-MLP norm -> gate/up
    v_o: Balance                         # v_proj -> o_proj (GQA: one factor per kv channel)
    up_down: Balance                     # up_proj -> down_proj (through the gated activation)
    linears: tuple[str, ...]             # every linear of a decoder layer, in execution order
    output_norms: tuple[str, ...] = ()   # norms applied to the *outputs* of o/down (Gemma 3)
    qk_norms: tuple[str, ...] = ()       # per-head norms on q and k (Gemma 3)
    norm_offset: float = 0.0             # RMSNorm multiplies by (offset + weight)
    qkv_bias: bool = False
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"


_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj")
_LINEARS = _ATTN + ("self_attn.o_proj",) + _MLP + ("mlp.down_proj",)
_V_O = Balance("self_attn.v_proj", ("self_attn.o_proj",))
_UP_DOWN = Balance("mlp.up_proj", ("mlp.down_proj",))

ARCH_MAPS: dict[str, ArchMap] = {
    "llama": ArchMap("llama", Balance("input_layernorm", _ATTN), Balance("post_attention_layernorm", _MLP),
                     _V_O, _UP_DOWN, _LINEARS),
    "qwen2": ArchMap("qwen2", Balance("input_layernorm", _ATTN), Balance("post_attention_layernorm", _MLP),
                     _V_O, _UP_DOWN, _LINEARS, qkv_bias=True),
    "gemma3_text": ArchMap(
        "gemma3_text", Balance("input_layernorm", _ATTN, 1.0), Balance("pre_feedforward_layernorm", _MLP, 1.0),
        _V_O, _UP_DOWN, _LINEARS,
        output_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
        qk_norms=("self_attn.q_norm", "self_attn.k_norm"), norm_offset=1.0),
}


def arch_map(model: nn.Module) -> ArchMap:
    mt = model.config.model_type
    if mt not in ARCH_MAPS:
        raise SlmquantError(f"architecture {mt!r} is not supported; slmquant supports {', '.join(ARCH_MAPS)}")
    return ARCH_MAPS[mt]


def heads(model: nn.Module) -> tuple[int, int, int]:
    """(query heads, kv heads, head_dim); query heads per kv head = the GQA group size."""
    c = model.config
    n_q, n_kv = c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads
    return n_q, n_kv, getattr(c, "head_dim", None) or c.hidden_size // n_q


def kv_max(t: torch.Tensor, hq: tuple[int, int, int]) -> torch.Tensor:
    """(n_q * hd,) per-channel statistics of the query heads -> (n_kv * hd,): for each key/value
    channel, the max over the query heads of its GQA group."""
    n_q, n_kv, hd = hq
    return t.view(n_kv, n_q // n_kv, hd).amax(1).reshape(-1)


def kv_to_q(s: torch.Tensor, hq: tuple[int, int, int]) -> torch.Tensor:
    """(n_kv * hd,) factors of the key/value channels -> (n_q * hd,): each repeated over the query
    heads of its group (e.g. o_proj's input columns for a factor folded into v_proj's rows)."""
    n_q, n_kv, hd = hq
    return s.view(n_kv, 1, hd).expand(-1, n_q // n_kv, -1).reshape(-1)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(arch_map(model).layers)


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def layer_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(full name, module) of every linear inside the decoder layers, in execution order."""
    amap, out = arch_map(model), []
    for i, layer in enumerate(decoder_layers(model)):
        out += [(f"{amap.layers}.{i}.{n}", layer.get_submodule(n)) for n in amap.linears]
    return out
