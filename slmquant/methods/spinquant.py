"""spinquant: learned rotations (SpinQuant, arXiv 2405.16406), then GPTQ (default) or RTN weights.

Steps: untie tied embeddings -> fuse every RMSNorm weight into the linears that read it (float64)
-> R4: down_proj's weights take H^T / sqrt(n) offline and its input the fast Hadamard transform
online (a QLinear `had`) -> R1 (residual stream) and one R2 per layer (value/output heads, shared by
the heads of a GQA group) start as random Hadamards and are learned by Cayley SGD on the Stiefel
manifold, minimising the language-model loss of the quantized rotated model with every weight
frozen -> folded into the weights (no extra operator but R4's online transform) -> weights rounded
by GPTQ on the rotated model (slmquant's GPTQ defaults; `act_order=false` is the reference's) or RTN.
Learning sees the weights as the rounding that follows will: float when GPTQ follows and activations
are quantized (the reference's W16A8 rule: W8A8 and W4A8 then share one learned rotation, through
the rotation cache), RTN-rounded otherwise (W4A16 with GPTQ, where W16A16 has nothing to learn).
Departures: the Cayley transform is solved exactly (the reference approximates it with 5
fixed-point iterations, row renormalization and an occasional random QR retraction), so R stays
orthogonal to float64 precision, checked after every step and on load; training windows are the
calibration windows taken in order and cycled (the reference reads 800 consecutive windows of the
train split, which is not available offline); activations are rounded per token, o_proj's input
too (the reference rounds it per head). KV cache: `kv_bits` rounds K (after RoPE) and V per (head,
token), asymmetric, as the reference's KV quantization; R3, a Hadamard over head_dim applied online
to Q and K after RoPE (slmquant.attn), comes with it as in the reference (`r3` sets it either way).
The paper's W4A8 setting leaves the KV cache in float, so by default neither is there."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from filelock import FileLock
from torch.func import functional_call
from tqdm.auto import tqdm

from .. import attn, cost
from .. import rotation as rot
from ..arch import arch_map, decoder_layers, heads, layer_linears, set_submodule
from ..errors import SlmquantError
from ..files import atomic_path
from ..quant import QLinear, QSpec, fake_quant, fake_quant_ste
from . import register
from .gptq import GPTQConfig, gptq_, mse_qparams


@dataclass(frozen=True)
class SpinQuantConfig(GPTQConfig):
    """Weights asymmetric (sym=False) and activations asymmetric per token (a_sym=False), as the
    paper; every GPTQ setting of GPTQConfig applies to the GPTQ step. w_clip (on, as the reference's
    evaluation scripts pass `--w_clip`): each row's weight range from the reference quantizer's
    clipping search, for GPTQ and RTN weights alike (SmolLM2 W4A8, quick profile: x1.113 of float
    against x1.186 without; docs/spinquant.md).
    weights: "gptq" or "rtn". learn: learn R1/R2 (false: fixed random Hadamards, QuaRot-like, the
    control). steps: Cayley SGD steps, `batch` windows of the calibration set each, in order (reference:
    100 steps of 8 windows of 2048 tokens). lr: the largest step (1.5, cosine decay to 0).
    max_grad_norm: global gradient-norm clip over R1 and every R2 (1.0: the reference's trainer).
    batch: windows per Cayley step, their gradients averaged, one window in memory at a time (1; the
    paper profile: 8, the reference's 8 GPUs x 1).
    kv_bits: K (after RoPE and R3) and V rounded per (head, token), asymmetric, to this many bits
    (16: float, the paper's W4A8 and W8A8). r3: Q and K turned by the head_dim Hadamard after RoPE
    (None: when kv_bits < 16, as the reference).
    learn_weights: the weights learning sees. "auto": the reference's rule (float when GPTQ follows
    and activations are rounded, RTN-rounded otherwise); "float"; "rtn": RTN-rounded to w_bits (at
    W4A8, a loss that sees the 4-bit rounding the rotation is meant to ease)."""
    sym: bool = False
    a_sym: bool = False
    w_clip: bool = True
    weights: str = "gptq"
    learn: bool = True
    steps: int = 100
    lr: float = 1.5
    max_grad_norm: float = 1.0
    batch: int = 1
    kv_bits: int = 16
    r3: bool | None = None
    learn_weights: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        if self.weights not in ("gptq", "rtn"):
            raise SlmquantError(f"weights must be gptq or rtn, got {self.weights!r}")
        if self.steps < 0 or self.lr < 0 or self.max_grad_norm <= 0 or self.batch < 1:
            raise SlmquantError("steps and lr must be >= 0, max_grad_norm > 0, batch >= 1")
        if self.w_bits == 16:
            raise SlmquantError("spinquant rounds the weights: w_bits must be below 16")
        if not (2 <= self.kv_bits <= 8 or self.kv_bits == 16):
            raise SlmquantError(f"kv_bits must be in 2..8, or 16 (float), got {self.kv_bits}")
        if self.learn_weights not in ("auto", "float", "rtn"):
            raise SlmquantError(f"learn_weights must be auto, float or rtn, got {self.learn_weights!r}")
        if self.learn_weights == "float" and self.a_bits == 16 and self.kv_bits == 16:
            raise SlmquantError("learn_weights=float with float activations leaves learning no rounding to reduce")

    @property
    def use_r3(self) -> bool:
        return self.kv_bits < 16 if self.r3 is None else self.r3

    @property
    def kv_spec(self) -> QSpec | None:
        return None if self.kv_bits == 16 else QSpec(self.kv_bits, sym=False, granularity="token")

    @property
    def train_w_spec(self):
        """The weight rounding learning sees (None: float)."""
        if self.learn_weights != "auto":
            return None if self.learn_weights == "float" else self.w_spec
        return None if self.weights == "gptq" and self.a_bits < 16 else self.w_spec


# The three bits widths, and the control (fixed random Hadamards, nothing learned) at W4A8, the
# width where the paper's learned rotations differ most from fixed ones.
SUITE = (("w8a8", {}), ("w4a8", {}), ("w4a16", {}), ("w4a8", {"learn": False}))
ORTHO_TOL = 1e-8


def cayley_step(R: torch.Tensor, G: torch.Tensor, lr: float) -> torch.Tensor:
    """One Cayley SGD step on the orthogonal group (Li et al., ICLR 2020; SpinQuant's optimizer with
    momentum 0). W = (R^T G - G^T R) / 2 is skew, alpha = min(lr, 1 / (||W||_1 + 1e-8)) (max column
    sum), R' = R (I - alpha/2 W)(I + alpha/2 W)^-1: orthogonal, and dL = -alpha ||W||_F^2 to first order."""
    R64, G64 = R.double(), G.double()
    W = _skew(R64, G64)
    alpha = min(lr, 1.0 / (float(W.abs().sum(0).max()) + 1e-8))
    eye = torch.eye(R.shape[0], dtype=torch.float64, device=R.device)
    # R' (I + a/2 W) = R (I - a/2 W)  <=>  (I + a/2 W)^T R'^T = (I - a/2 W)^T R^T
    Rn = torch.linalg.solve((eye + alpha / 2 * W).T, ((eye - alpha / 2 * W).T @ R64.T)).T
    return Rn.to(R.dtype)


def _skew(R: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """The tangent part of a gradient G at an orthogonal R, as the skew matrix (R^T G - G^T R) / 2."""
    return 0.5 * (R.T @ G - G.T @ R)


def prepare_(model: nn.Module) -> None:
    """Untie, fuse norms, and R4's offline half in down_proj (its online half: `install_online_r4_`)."""
    rot.check_rotatable(model)
    rot.untie_embeddings_(model)
    rot.fuse_norms_(model)
    amap = arch_map(model)
    for layer in decoder_layers(model):
        rot.rotate_down_input_(layer.get_submodule(amap.up_down.linears[0]))


@torch.no_grad()
def install_online_r4_(model: nn.Module) -> None:
    """down_proj becomes a float QLinear that rotates its input online (`had`): the Hadamard then
    stays in front of down_proj's activation rounding through GPTQ, RTN, the cache and real models."""
    name = arch_map(model).up_down.linears[0]
    for layer in decoder_layers(model):
        q = QLinear.from_linear(layer.get_submodule(name), None, None)
        q.had = q.in_features
        layer.set_submodule(name, q)


def install_attn_(model: nn.Module, cfg: SpinQuantConfig) -> None:
    """R3 and the KV cache's rounding on every attention module (nothing when neither is set)."""
    if not cfg.use_r3 and cfg.kv_spec is None:
        return
    name = arch_map(model).v_o.prev.rpartition(".")[0]
    for layer in decoder_layers(model):
        attn.install(model, layer.get_submodule(name), cfg.kv_spec, q=False, r3=cfg.use_r3)


def _rotated_layer(base: dict, R1: torch.Tensor, R2: torch.Tensor, i: int, amap, hq, w_spec) -> dict:
    """{parameter name: tensor} of decoder layer i's linears with R1 and its R2 folded in
    (differentiable in R1 and R2), weights rounded straight-through when w_spec is given."""
    n_q, n_kv, hd = hq
    p, out = f"{amap.layers}.{i}.", {}
    for n in amap.attn_in.linears + amap.mlp_in.linears:
        out[p + n + ".weight"] = base[p + n + ".weight"] @ R1                       # readers: W R1
    for n in (amap.v_o.linears[0], amap.up_down.linears[0]):
        out[p + n + ".weight"] = R1.T @ base[p + n + ".weight"]                     # writers: R1^T W
    v, o = p + amap.v_o.prev, p + amap.v_o.linears[0]
    Wv = out[v + ".weight"]
    out[v + ".weight"] = torch.einsum("dc,hdi->hci", R2, Wv.view(n_kv, hd, -1)).reshape(Wv.shape)
    if v + ".bias" in base:
        out[v + ".bias"] = (base[v + ".bias"].view(n_kv, hd) @ R2).reshape(-1)
    Wo = out[o + ".weight"]
    out[o + ".weight"] = (Wo.view(Wo.shape[0], n_q, hd) @ R2).reshape(Wo.shape)
    return {k: fake_quant_ste(t, w_spec) if k.endswith(".weight") else t for k, t in out.items()}


def _rotated(base: dict, R1: torch.Tensor, R2s: list, amap, hq, w_spec) -> dict:
    """`_rotated_layer` of every decoder layer, in one dict."""
    return {k: t for i, R2 in enumerate(R2s) for k, t in _rotated_layer(base, R1, R2, i, amap, hq, w_spec).items()}


def _hooks_weight_side(model, params, amap, a_spec) -> list:
    """Rotated weights (`_rotated`, through functional_call): the embedding's output turns with R1
    and the LM head reads it turned back (the reference's way: no (vocab x hidden) product per step);
    every linear's input rounded straight-through, down_proj's after R4's online half."""
    handles = [model.get_submodule(amap.embed).register_forward_hook(lambda m, a, y: y @ params[0]),
               model.get_submodule(amap.lm_head).register_forward_pre_hook(lambda m, a: (a[0] @ params[0].T,))]
    down = amap.up_down.linears[0]
    for name, lin in layer_linears(model):
        online = rot.fht if name.endswith("." + down) else (lambda x: x)
        handles.append(lin.register_forward_pre_hook(lambda m, a, f=online: (fake_quant_ste(f(a[0]), a_spec),)))
    return handles


def _hooks_activation_side(model, params, amap, hq, a_spec) -> list:
    """With float weights the rotated model equals the unrotated one except where it rounds, so the
    rotations act on the rounded activations alone (exact, and no weight product per step): a reader
    of the stream computes Q(x R1) (W R1)^T = [Q(x R1) R1^T] W^T, o_proj [Q(u R2) R2^T] W_o^T per head,
    down_proj Q(x H4^T/sqrt(n)) with its offline half in its weights; q/k/v (gate/up) share their
    norm's rounded output."""
    n_q, _, hd = hq
    turn = lambda x: fake_quant_ste(x @ params[0], a_spec) @ params[0].T

    def heads_turn(x, R2):
        u = fake_quant_ste((x.view(*x.shape[:-1], n_q, hd) @ R2).reshape(x.shape), a_spec)
        return (u.view(*x.shape[:-1], n_q, hd) @ R2.T).reshape(x.shape)
    handles = []
    for i, layer in enumerate(decoder_layers(model)):
        for b in (amap.attn_in, amap.mlp_in):
            handles.append(layer.get_submodule(b.prev).register_forward_hook(lambda m, a, y: turn(y)))
        handles.append(layer.get_submodule(amap.v_o.linears[0]).register_forward_pre_hook(
            lambda m, a, R2=params[1 + i]: (heads_turn(a[0], R2),)))
        handles.append(layer.get_submodule(amap.up_down.linears[0]).register_forward_pre_hook(
            lambda m, a: (fake_quant_ste(rot.fht(a[0]), a_spec),)))
    return handles


def _step_grads(model, windows: list, params: list, base: dict, amap, hq, w_spec, step: int = 0):
    """The mean LM loss over `windows` (each (1, T)) and its gradients in R1 and the R2s (float64).
    With rotated weights (`base` given), in two stages: the weights are built without a graph, as
    leaves, the model's backward stops at them, and then each layer's weights are built again with
    their graph, one layer at a time, to carry the weights' gradients to R1 and its R2 (chain rule,
    exact). The one-graph way held the rotation's and the rounding's intermediates for every layer
    at once, four more copies of the decoder's weights: Qwen2.5-0.5B's learning at W4A8 grew its
    peak past 16 GiB. The price: the rotation's products computed twice a step (docs/spinquant.md)."""
    weights = {}
    if base:
        with torch.no_grad():
            weights = {k: t.requires_grad_() for k, t in _rotated(base, params[0], params[1:], amap, hq, w_spec).items()}
    leaves = params + list(weights.values())
    grads, loss = None, 0.0
    for w in windows:                                           # one window at a time, averaged
        kw = {"labels": w, "use_cache": False}
        part = (functional_call(model, weights, (w,), kw) if base else model(w, **kw)).loss / len(windows)
        if not torch.isfinite(part):
            raise SlmquantError(f"spinquant: non-finite loss at step {step}")
        # R2 reaches this loss through the weights alone in the rotated-weight form (zeros here);
        # in the activation-side form every rotation must be used: a hook that failed would raise
        g_ = torch.autograd.grad(part, leaves, allow_unused=bool(base), materialize_grads=bool(base))
        g_ = [G.double() for G in g_[:len(params)]] + list(g_[len(params):])    # R1, R2 summed in float64
        if grads is None:
            grads = g_
        else:
            for a, b in zip(grads, g_):
                a.add_(b)
        loss += part.item()
        del part, g_                # the graph's last references to the weights, and a window's gradients
    out = grads[:len(params)]
    dW = dict(zip(weights, grads[len(params):]))
    del weights, grads, leaves
    for i in range(len(params) - 1) if base else ():
        layer = _rotated_layer(base, params[0], params[1 + i], i, amap, hq, w_spec)
        g1, g2 = torch.autograd.grad(list(layer.values()), [params[0], params[1 + i]],
                                     grad_outputs=[dW.pop(k) for k in layer])
        out[0] += g1.double()
        out[1 + i] += g2.double()
    return out, loss


def learn_rotations(model: nn.Module, calib: torch.Tensor, cfg: SpinQuantConfig,
                    progress: bool = True) -> dict:
    """R1 and the R2s (float64) for a prepared model: random Hadamards, then cfg.steps Cayley SGD
    steps on the LM loss of the rotated model with rounded activations (and rounded weights where
    `train_w_spec` says so). Returns {"R1", "R2", "loss": [per step], "ortho": max orthogonality
    error after any step}."""
    amap, hq = arch_map(model), heads(model)
    g = torch.Generator().manual_seed(cfg.seed)
    R1 = rot.random_hadamard(model.config.hidden_size, g)
    R2s = [rot.random_hadamard(hq[2], g) for _ in decoder_layers(model)]
    res = {"R1": R1, "R2": R2s, "loss": [], "ortho": 0.0}
    if not cfg.learn or cfg.steps == 0:
        return res
    dev = next(model.parameters()).device
    master = [R.to(dev) for R in [R1, *R2s]]                  # float64: orthogonal to 1e-15
    dtype = next(model.parameters()).dtype
    params = [R.to(dtype).requires_grad_() for R in master]  # copies in the model's dtype, for the forward
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)                              # no weight gradients: R1, R2 only
    w_spec = cfg.train_w_spec
    base = {}
    # the activation-side form rounds in the unrotated model, where V is not yet in R2's basis: a
    # rounded KV cache needs the rotated weights
    if w_spec is not None or cfg.kv_spec is not None:
        for i, layer in enumerate(decoder_layers(model)):
            for n in amap.linears:
                lin = layer.get_submodule(n)
                base[f"{amap.layers}.{i}.{n}.weight"] = lin.weight.detach().float()
                if n == amap.v_o.prev and lin.bias is not None:
                    base[f"{amap.layers}.{i}.{n}.bias"] = lin.bias.detach().float()
        handles = _hooks_weight_side(model, params, amap, cfg.a_spec)
    else:
        handles = _hooks_activation_side(model, params, amap, hq, cfg.a_spec)
    bar = tqdm(range(cfg.steps), desc="spinquant: rotations", unit="step", disable=not progress)
    try:
        with torch.enable_grad():
            for step in bar:
                wins = [calib[(step * cfg.batch + j) % len(calib)][None].to(dev) for j in range(cfg.batch)]
                grads, loss = _step_grads(model, wins, params, base, amap, hq, w_spec, step)
                # the clip measures the gradient's tangent part skew(R^T G), the only part a Cayley
                # step uses: the whole gradient's norm differs between the two forms (0.42 and 0.23
                # measured on a tiny model, for the same tangent part, 6e-4)
                norm = math.sqrt(sum(float(_skew(R, G).pow(2).sum()) for R, G in zip(master, grads)))
                clip = min(1.0, cfg.max_grad_norm / (norm + 1e-6))
                lr_t = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))       # cosine, no warmup
                with torch.no_grad():
                    for R, p, G in zip(master, params, grads):
                        R.copy_(cayley_step(R, G * clip, lr_t))
                        res["ortho"] = max(res["ortho"], rot.orthogonality_error(R))
                        p.copy_(R)
                res["loss"].append(loss)
                bar.set_postfix(loss=f"{loss:.3f}")
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(frozen[n])
    res["R1"], res["R2"] = master[0].cpu(), [R.cpu() for R in master[1:]]
    return res


def _rotation_cache(model: nn.Module, calib: torch.Tensor, cfg: SpinQuantConfig):
    """Where learned rotations are kept: keyed by the model, the calibration windows, what learning
    depends on (not the GPTQ settings), and this file, so that W8A8 and W4A8 share one learning."""
    from ..models import cache_dir, device_name
    from . import get_method
    learn = {k: getattr(cfg, k) for k in ("learn", "steps", "lr", "max_grad_norm", "seed", "a_bits", "a_sym",
                                           "batch", "kv_bits", "use_r3")}
    learn["train_w_spec"] = asdict(cfg.train_w_spec) if cfg.train_w_spec else None
    learn["dtype"], learn["device"] = str(next(model.parameters()).dtype), device_name()
    src = getattr(model, "slmquant_source", None)
    h = hashlib.sha256(json.dumps({"learn": learn, "code": get_method("spinquant").source_hash(),
                                   "model": src.to_dict() if src else model.config.to_json_string()},
                                  sort_keys=True, default=str).encode())
    h.update(calib.numpy().tobytes())
    if src is None or src.kind == "tiny":
        for t in model.state_dict().values():
            h.update(t.detach().float().cpu().numpy().tobytes())
    return cache_dir() / "spinquant-rotations" / f"{h.hexdigest()[:20]}.pt"


def cached_rotations(model: nn.Module, calib: torch.Tensor, cfg: SpinQuantConfig, progress: bool = True) -> dict:
    """R1 and the R2s for a prepared model (`prepare_`), from the rotation cache, learned and stored
    there on a miss (or when a stored one is not orthogonal), under the entry's lock: a W8A8 and a
    W4A8 worker learn their shared rotation once. The learning's wall time and peak-memory growth
    are stored with it ("learn_cost") and "from_cache" says whether this call read it."""
    path = _rotation_cache(model, calib, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        res = torch.load(path, weights_only=True) if path.is_file() else None
        if res is not None and max(rot.orthogonality_error(R) for R in [res["R1"], *res["R2"]]) > ORTHO_TOL:
            res = None                                          # not orthogonal: learned again
        if res is not None:
            return {**res, "from_cache": True}
        res, c = cost.measure(lambda: learn_rotations(model, calib, cfg, progress),
                              str(next(model.parameters()).device))
        res["learn_cost"] = {"wall_s": c.wall_s, "peak_growth_bytes": c.peak_mem_bytes}
        with atomic_path(path) as tmp:
            torch.save(res, tmp)
    return {**res, "from_cache": False}


@register("spinquant", SpinQuantConfig, suite=SUITE)
def spinquant(model: nn.Module, calib: torch.Tensor, cfg: SpinQuantConfig, progress: bool = True) -> nn.Module:
    if calib is None:
        raise SlmquantError("spinquant needs calibration windows")
    prepare_(model)
    install_attn_(model, cfg)                            # learning and GPTQ see the KV cache's rounding
    res = cached_rotations(model, calib, cfg, progress)
    with torch.no_grad():
        rot.rotate_residual_(model, res["R1"])
        for layer, R2 in zip(decoder_layers(model), res["R2"]):
            rot.rotate_heads_(model, layer, R2)
    install_online_r4_(model)
    if cfg.weights == "gptq":
        gptq_(model, calib, cfg, cfg.a_spec, progress)
    else:
        with torch.no_grad():
            for name, lin in layer_linears(model):
                w = fake_quant(lin.weight, cfg.w_spec, *mse_qparams(lin.weight, cfg.w_spec)) if cfg.w_clip else None
                set_submodule(model, name, QLinear.from_linear(lin, cfg.w_spec, cfg.a_spec, weight=w))
    model.slmquant_method_info = {"loss": res["loss"], "orthogonality_error": res["ortho"],
                                  "learned": bool(cfg.learn and cfg.steps),
                                  # the rotations' cost, charged to every cell that uses them (cost.py)
                                  "shared_cost": {"what": "rotations", "from_cache": res["from_cache"],
                                                  **res["learn_cost"]}}
    return model
