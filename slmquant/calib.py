"""Layer-by-layer calibration shared by every method: capture what enters the first decoder layer,
then walk the layers one at a time on the current (partly quantized) model, collecting activation
statistics and Hessians through hooks. Only one layer's inputs and outputs are held at a time."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from .arch import arch_map, decoder_layers


@dataclass
class LayerInputs:
    """Hidden states entering a decoder layer, one (1, T, C) tensor per calibration window, and the
    keyword arguments each layer is called with (masks, rotary embeddings: they depend on the
    positions only, so one set per layer serves every window of the same length)."""
    hidden: list[torch.Tensor]
    layer_kwargs: list[dict]


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, windows: torch.Tensor) -> LayerInputs:
    """Run windows (N, T) through the embeddings only: every decoder layer is stubbed to record its
    input and kwargs and pass the hidden state through, so this costs no layer compute."""
    layers = decoder_layers(model)
    hidden: list[torch.Tensor] = []
    kwargs: list[dict | None] = [None] * len(layers)
    originals = [layer.forward for layer in layers]

    def stub(i):
        def forward(hidden_states, *args, **kw):
            if i == 0:
                hidden.append(hidden_states.detach())
            if kwargs[i] is None:
                kwargs[i] = {k: v for k, v in kw.items() if k not in ("past_key_values", "use_cache")}
            return hidden_states
        return forward

    base = model.get_submodule(arch_map(model).layers.rsplit(".", 1)[0])
    device = next(model.parameters()).device
    try:
        for i, layer in enumerate(layers):
            layer.forward = stub(i)
        for w in windows:
            base(input_ids=w[None].to(device), use_cache=False)
    finally:
        for layer, fwd in zip(layers, originals):
            layer.forward = fwd
    return LayerInputs(hidden, kwargs)


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    """Outputs of one decoder layer for each input window."""
    return [layer(x, **kwargs) for x in inputs]


def walk_layers(model: nn.Module, windows: torch.Tensor, fn) -> None:
    """For each decoder layer i in order: fn(i, layer, inputs, kwargs) (which may collect statistics
    and quantize the layer in place), then the layer's outputs, computed *after* fn, become the next
    layer's inputs: later layers calibrate on what the already-quantized earlier layers produce."""
    state = capture_layer_inputs(model, windows)
    x = state.hidden
    for i, layer in enumerate(decoder_layers(model)):
        fn(i, layer, x, state.layer_kwargs[i])
        x = run_layer(layer, x, state.layer_kwargs[i])


@contextmanager
def input_hooks(modules: dict[str, nn.Module], collect):
    """Call collect(name, x) with the input x of each module on every forward, inside the block: the
    input its weights see (after a QLinear's online Hadamard, `prepare_input`)."""
    def hook(mod, args, n):
        prep = getattr(mod, "prepare_input", None)
        collect(n, args[0] if prep is None else prep(args[0]))
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: hook(mod, args, n)) for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def act_absmax(stats: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> None:
    """Running per-input-channel max |x| over every token. x: (..., C)."""
    m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
    stats[name] = torch.maximum(stats[name], m) if name in stats else m


def make_hessian(n: int, device=None) -> dict:
    return {"H": torch.zeros(n, n, dtype=torch.float32, device=device), "count": 0}


def accumulate_hessian(state: dict, x: torch.Tensor) -> None:
    """H = 2/N sum_i x_i x_i^T over every token seen so far (the GPTQ Hessian of ||WX - QX||^2),
    kept as a running mean so that windows can be added one at a time. x: (..., C)."""
    X = x.detach().reshape(-1, x.shape[-1]).float()         # (tokens, C)
    n_new = X.shape[0]
    total = state["count"] + n_new
    state["H"].mul_(state["count"] / total).add_(X.T @ X, alpha=2.0 / total)
    state["count"] = total
