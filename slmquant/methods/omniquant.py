"""omniquant: learnable weight clipping (LWC) and learnable equivalent transformation (LET), trained
block by block to reproduce the float block's output (OmniQuant, arXiv 2308.13137).

Steps, per decoder block: run the float block on float inputs (targets; activation maxima for the
LET start) -> train LET scales and LWC factors with AdamW on the MSE between the quantized block's
output on the quantized stream and the target -> fold them (norm weights / s, linear columns * s,
v rows / s, o columns * s; weights replaced by their clipped fake-quant values) -> run the folded
block on the quantized stream for the next block. The final model has no extra operators.
Departures from the reference code: LET is GQA-exact (one factor per key/value channel, repeated
over its query heads, where the reference raises and LLMC skips; `gqa="llmc"` reproduces LLMC's
skip, which trains v_proj on unscaled weights while the folded model keeps the norm scaling);
the fold is float32 (`fold_fp16` reproduces the reference's fp16 fold); a non-finite loss or
parameter sends the block back to its last finite state instead of stopping. Shifts are off, as
the reference does for RMSNorm models (every architecture here). The reference also rounds the
attention inputs (Q and K after RoPE, V) per (head, token): `quant_attn` does so (slmquant.attn), off
by default as in the paper's setting. q/k scaling is not learned: with Q and K unrounded it is inert
(a per-row scale of q and k rows commutes with per-row weight rounding); with `quant_attn` it would
balance Q's and K's channels before their rounding, but it acts before RoPE, where it is exact only
if both channels of each rotation pair share a factor: not built (the reference starts it at ones).
`let_down` adds a LET pair the reference does not have: up_proj -> down_proj (off by default)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from tqdm.auto import tqdm

from .. import attn
from ..arch import arch_map, decoder_layers, heads, kv_max, kv_to_q
from ..calib import act_absmax, capture_layer_inputs, input_hooks
from ..errors import SlmquantError
from ..files import atomic_path
from ..quant import QLinear, fake_quant_ste, lwc_fake_quant, lwc_qparams
from .gptq import GPTQConfig, gptq_weight
from .gptq import _collect as gptq_collect
from . import CalibConfig, register


@dataclass(frozen=True)
class OmniQuantConfig(CalibConfig):
    """Weights asymmetric (sym=False), activations symmetric per token: the SLMQuant paper's setting.
    epochs: passes over the calibration windows per block, batch 1 (reference scripts: 20).
    lwc_lr / let_lr: AdamW learning rates of the clipping factors and the LET scales (1e-2, 5e-3);
    wd: weight decay (0). alpha: LET start s = max|X|^alpha / max|W|^(1-alpha) (0.5).
    let: learn the equivalent transformation; None: on when activations are quantized (W4A16 is LWC
    only, as the reference's weight-only runs). lwc: learn the clipping (off: plain min/max).
    gqa: "exact" (GQA-aware v -> o) or "llmc" (LLMC's handling, see the module docstring).
    fold_fp16: fold the LET into float16 weights as the reference code does (default float32).
    quant_attn: also round the attention inputs (Q and K after RoPE, V) per (head, token) with the
    activation spec, in training and in the model, as the reference code does (default off).
    aug_loss: add the reference's `--aug_loss` term, the MSE to the float block applied to the
    quantized block's own inputs (default off, as in the reference's W4A8 and W8A8 scripts).
    loss: "mse" (the reference's mean squared error over every position and channel) or "token"
    (each position's squared error relative to its float target's mean square, averaged over
    positions: the error every later RMSNorm sees, so that a few massive-activation positions do
    not outweigh the rest of the window; 8% more KL than mse on SmolLM2 W4A8's held-out windows,
    docs/omniquant.md).
    let_down: also learn a LET pair up_proj -> down_proj (up's rows / s, down's columns * s: exact
    through the gated product act(gate) * up), started like the others from down_proj's input
    maxima. Not in the reference (its llama LET leaves down_proj alone); off by default.
    weights: "rtn" (the reference: each row rounded to nearest on its learned clipped range) or
    "gptq": after a block's training, its LET-folded float weights are rounded by GPTQ (slmquant's
    defaults: act order, block 128, damping 0.01) on each row's learned clipped range (LWC's grid)
    against the Hessians of the block's inputs on the quantized stream, and the next block trains on
    that block's outputs. Not OmniQuant's method (its rounding is to nearest); off by default.
    Per-channel weights only (groups: LWC's per-group ranges are not passed to GPTQ)."""
    sym: bool = False
    epochs: int = 20
    lwc_lr: float = 1e-2
    let_lr: float = 5e-3
    wd: float = 0.0
    alpha: float = 0.5
    let: bool | None = None
    lwc: bool = True
    gqa: str = "exact"
    fold_fp16: bool = False
    quant_attn: bool = False
    aug_loss: bool = False
    loss: str = "mse"
    let_down: bool = False
    weights: str = "rtn"

    def __post_init__(self):
        super().__post_init__()
        if self.epochs < 0 or self.lwc_lr < 0 or self.let_lr < 0 or self.wd < 0:
            raise SlmquantError("epochs, lwc_lr, let_lr and wd must be >= 0")
        if not 0 <= self.alpha <= 1:
            raise SlmquantError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.gqa not in ("exact", "llmc"):
            raise SlmquantError(f"gqa must be exact or llmc, got {self.gqa!r}")
        if self.loss not in LOSSES:
            raise SlmquantError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.weights not in ("rtn", "gptq"):
            raise SlmquantError(f"weights must be rtn or gptq, got {self.weights!r}")
        if self.weights == "gptq" and self.group_size:
            raise SlmquantError("weights=gptq takes per-channel weights (LWC's ranges per row)")
        if self.quant_attn and self.a_bits == 16:
            raise SlmquantError("quant_attn=true needs quantized activations (a_bits < 16)")
        if self.let_down and not self.use_let:
            raise SlmquantError("let_down=true needs LET (quantized activations, let not false)")
        if self.let and self.a_bits == 16:
            raise SlmquantError("let=true needs quantized activations (a_bits < 16): LET only moves "
                                "activation outliers into the weights")

    @property
    def use_let(self) -> bool:
        return self.a_bits < 16 if self.let is None else self.let


SUITE = (("w8a8", {}), ("w4a8", {}), ("w4a16", {}))
LWC_INIT = 4.0              # reference: sigmoid(4) = 0.982, weights mildly clipped from the first step
LET_MIN = 1e-2              # reference: |s| < 1e-2 becomes sign(s) * 1e-2 before every use


class Block:
    """One decoder block's frozen float weights and its learnable LET scales and LWC logits;
    `weights()` gives the transformed, fake-quantized tensors by parameter name."""

    def __init__(self, layer: nn.Module, act_max: dict[str, torch.Tensor], cfg: OmniQuantConfig, amap, hq):
        self.cfg, self.amap = cfg, amap
        self.hq = hq                                    # (query heads, kv heads, head_dim)
        self.W = {n: layer.get_submodule(n).weight.detach().clone() for n in amap.linears}
        self.b = {n: layer.get_submodule(n).bias.detach().clone() for n in amap.linears
                  if layer.get_submodule(n).bias is not None}
        self.norm = {b.prev: layer.get_submodule(b.prev).weight.detach().clone() for b in (amap.attn_in, amap.mlp_in)}
        self.let: dict[str, torch.Tensor] = {}
        if cfg.use_let:
            for b, key in ((amap.attn_in, amap.attn_in.linears[0]), (amap.mlp_in, amap.up_down.prev)):
                self.let[b.prev] = _let_init(act_max[b.linears[0]], self.W[key].abs().amax(0), cfg.alpha)
            o = amap.v_o.linears[0]
            self.let["v_o"] = _let_init(kv_max(act_max[o], hq), kv_max(self.W[o].abs().amax(0), hq), cfg.alpha)
            if cfg.let_down:
                d = amap.up_down.linears[0]
                self.let["up_down"] = _let_init(act_max[d], self.W[d].abs().amax(0), cfg.alpha)
        spec = cfg.w_spec
        rows = lambda W: W.shape[0] * (W.shape[1] // spec.group_size if spec.group_size else 1)
        self.lwc = {n: (torch.full((rows(W),), LWC_INIT, dtype=torch.float32, device=W.device),
                        torch.full((rows(W),), LWC_INIT, dtype=torch.float32, device=W.device))
                    for n, W in self.W.items()}
        for t in self.params():
            t.requires_grad_(True)

    def params(self) -> list[torch.Tensor]:
        return self.let_params() + self.lwc_params()

    def let_params(self) -> list[torch.Tensor]:
        return list(self.let.values())

    def lwc_params(self) -> list[torch.Tensor]:
        return [t for pair in self.lwc.values() for t in pair] if self.cfg.lwc else []

    def clip(self, n: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Linear n's LWC logits (gamma, beta); with `lwc` off, logits whose sigmoid is 1 (the
        whole range)."""
        gamma, beta = self.lwc[n]
        return (gamma, beta) if self.cfg.lwc else (torch.full_like(gamma, 30.0), torch.full_like(beta, 30.0))

    def state(self) -> dict:
        return {"let": {k: v.detach().clone() for k, v in self.let.items()},
                "lwc": {k: [t.detach().clone() for t in v] for k, v in self.lwc.items()}}

    @torch.no_grad()
    def load(self, state: dict) -> None:
        for k, v in state["let"].items():
            self.let[k].copy_(v)
        for k, v in state["lwc"].items():
            for t, u in zip(self.lwc[k], v):
                t.copy_(u)

    @torch.no_grad()
    def truncate_(self) -> None:
        for s in self.let.values():                     # away from zero, sign kept (reference)
            small = s.abs() < LET_MIN
            s[small] = torch.where(s[small] < 0, -LET_MIN, LET_MIN)

    def weights(self, deploy: bool = False, quantize: bool = True) -> dict[str, torch.Tensor]:
        """{parameter name: tensor} of the transformed block. deploy: the folded model's weights
        (differs from training only with gqa="llmc", whose training skips v's norm scaling).
        quantize=False: the transformation alone, in the weights' own dtype (equivalence tests)."""
        a, cfg, off = self.amap, self.cfg, self.amap.norm_offset
        W, b, norm = dict(self.W), dict(self.b), dict(self.norm)
        if cfg.fold_fp16 and deploy:
            W, b, norm = ({k: v.half() for k, v in d.items()} for d in (W, b, norm))
        for bal in (a.attn_in, a.mlp_in):
            if bal.prev in self.let:
                s = self.let[bal.prev].to(W[bal.linears[0]].dtype)
                norm[bal.prev] = (off + norm[bal.prev]) / s - off                # norm(x) / s
                for n in bal.linears:
                    W[n] = W[n] * s                                               # W[:, j] * s_j
        v, o = a.v_o.prev, a.v_o.linears[0]
        gqa = self.hq[1] != self.hq[0]
        if cfg.gqa == "llmc" and gqa and not deploy and self.let:
            W[v] = self.W[v]                                  # LLMC: v trained on its raw weights
        if "v_o" in self.let and not (cfg.gqa == "llmc" and gqa):
            s = self.let["v_o"].to(W[v].dtype)
            W[v] = W[v] / s[:, None]                                              # v rows / s
            if v in b:
                b[v] = b[v] / s
            W[o] = W[o] * kv_to_q(s, self.hq)
        if "up_down" in self.let:
            up, down = a.up_down.prev, a.up_down.linears[0]
            s = self.let["up_down"].to(W[up].dtype)
            W[up] = W[up] / s[:, None]                                            # up rows / s
            if up in b:
                b[up] = b[up] / s
            W[down] = W[down] * s                                                 # down columns * s
        out = {f"{k}.weight": v_.to(self.norm[k].dtype) for k, v_ in norm.items()}
        out.update({f"{k}.bias": v_.to(self.b[k].dtype) for k, v_ in b.items()})
        if not quantize:
            return {**out, **{f"{n}.weight": Wn.to(self.W[n].dtype) for n, Wn in W.items()}}
        for n, Wn in W.items():
            Wq = lwc_fake_quant(Wn if Wn.dtype == torch.float64 else Wn.float(), cfg.w_spec, *self.clip(n))
            out[f"{n}.weight"] = (Wq.half() if cfg.fold_fp16 and deploy else Wq).to(self.W[n].dtype)
        return out


def _let_init(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^alpha / max|W|^(1-alpha) (reference: key linear only, abs max per input channel)."""
    x_max, w_max = x_max.float().clamp(min=1e-5), w_max.float().clamp(min=1e-5)
    return (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


def _act_quant_hooks(layer: nn.Module, amap, a_spec):
    """Forward pre-hooks quantizing every linear's input (straight-through), as QLinear does."""
    return [layer.get_submodule(n).register_forward_pre_hook(lambda m, args: (fake_quant_ste(args[0], a_spec),))
            for n in amap.linears] if a_spec is not None else []


def token_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each position's mean squared error over its float target's mean square, averaged over
    positions (`loss="token"`)."""
    err = (out - target).pow(2).mean(-1)
    return (err / target.pow(2).mean(-1).clamp(min=1e-12)).mean()


LOSSES = {"mse": F.mse_loss, "token": token_mse}


def block_loss(layer, weights, x, kw, target, target_q=None, loss: str = "mse") -> torch.Tensor:
    """The loss (`LOSSES`) of the block's output to the float block's output on float inputs, plus
    (aug_loss) the same to the float block's output on the same quantized-stream input."""
    out = functional_call(layer, weights, (x,), kw)
    fn = LOSSES[loss]
    value = fn(out, target)
    return value if target_q is None else value + fn(out, target_q)


def train_block(layer: nn.Module, blk: Block, q_in, kw, target, cfg: OmniQuantConfig, target_q=None) -> dict:
    """AdamW on the block's LET and LWC parameters, batch 1, fixed window order (reference).
    target_q: the aug_loss targets, one per window, or None.
    A non-finite loss or parameter sends the block back to its last finite epoch-end state (or its
    start) and ends its training. Returns {"loss": [mean loss per epoch], "nonfinite": bool}."""
    groups = [g for g in ({"params": blk.let_params(), "lr": cfg.let_lr},
                          {"params": blk.lwc_params(), "lr": cfg.lwc_lr}) if g["params"]]
    out = {"loss": [], "nonfinite": False}
    if not groups or cfg.epochs == 0:
        return out
    opt = torch.optim.AdamW(groups, weight_decay=cfg.wd)
    good = blk.state()
    hooks = _act_quant_hooks(layer, blk.amap, cfg.a_spec)
    try:
        with torch.enable_grad():
            for _ in range(cfg.epochs):
                total = 0.0
                for x, y, y_q in zip(q_in, target, target_q or [None] * len(q_in)):
                    blk.truncate_()
                    loss = block_loss(layer, blk.weights(), x, kw, y, y_q, cfg.loss)
                    if not torch.isfinite(loss):
                        break
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += loss.item()
                if not torch.isfinite(loss) or not all(torch.isfinite(p).all() for p in blk.params()):
                    blk.load(good)
                    out["nonfinite"] = True
                    break
                good = blk.state()
                out["loss"].append(total / len(q_in))
    finally:
        for h in hooks:
            h.remove()
    return out


@torch.no_grad()
def fold_block_(layer: nn.Module, blk: Block, cfg: OmniQuantConfig, quantize: bool = True) -> None:
    """Write the trained transformation into the layer: norms and biases updated, every linear a
    QLinear holding its clipped fake-quant weights (described by the cell's weight spec).
    quantize=False: the transformation alone, the linears staying float (equivalence tests)."""
    blk.truncate_()
    w = blk.weights(deploy=True, quantize=quantize)
    for n in blk.norm:
        layer.get_submodule(n).weight.copy_(w[f"{n}.weight"])
    for n in blk.amap.linears:
        lin = layer.get_submodule(n)
        if lin.bias is not None:
            lin.bias.copy_(w[f"{n}.bias"])
        if not quantize:
            lin.weight.copy_(w[f"{n}.weight"])
            continue
        layer.set_submodule(n, QLinear.from_linear(lin, cfg.w_spec, cfg.a_spec, weight=w[f"{n}.weight"]))


@torch.no_grad()
def gptq_block_(layer: nn.Module, blk: Block, inputs: list[torch.Tensor], kw: dict, cfg: OmniQuantConfig) -> None:
    """weights="gptq": round a folded block's float linears with GPTQ, each row on its learned
    clipped range, against the Hessians of the block's inputs (one pass over `inputs`, linears fed by
    one tensor sharing theirs); install QLinears."""
    mods = {n: layer.get_submodule(n) for n in blk.amap.linears}
    hess: dict[str, dict] = {}
    gptq_collect(layer, mods, inputs, kw, hess)
    gcfg = GPTQConfig()
    for n, lin in mods.items():
        grid = lwc_qparams(lin.weight.float(), cfg.w_spec, *blk.clip(n))
        r = gptq_weight(lin.weight, hess[n]["H"], cfg.w_spec, gcfg.block_size, gcfg.damp, gcfg.act_order,
                        params=grid)
        layer.set_submodule(n, QLinear.from_linear(lin, cfg.w_spec, cfg.a_spec, weight=r.weight))


@torch.no_grad()
def float_pass(layer: nn.Module, amap, inputs: list[torch.Tensor], kw: dict):
    """The float block on float inputs: (outputs, the LET start's per-channel max|x| at the inputs
    of q/k/v, gate/up, o and down)."""
    act_max: dict[str, torch.Tensor] = {}
    keys = {amap.attn_in.linears[0], amap.mlp_in.linears[0], amap.v_o.linears[0], amap.up_down.linears[0]}
    with input_hooks({n: layer.get_submodule(n) for n in keys}, lambda n, x: act_absmax(act_max, n, x)):
        return [layer(x, **kw) for x in inputs], act_max


def _resume_dir(model: nn.Module, calib: torch.Tensor, cfg: OmniQuantConfig):
    """Where a build keeps its finished blocks (LET/LWC state and losses): keyed by the model, the
    calibration windows, every setting and this file, so a resumed build is the interrupted one."""
    from ..models import cache_dir
    from . import get_method
    src = getattr(model, "slmquant_source", None)
    h = hashlib.sha256(json.dumps({"cfg": asdict(cfg), "code": get_method("omniquant").source_hash(),
                                   "model": src.to_dict() if src else model.config.to_json_string()},
                                  sort_keys=True, default=str).encode())
    h.update(calib.numpy().tobytes())
    if src is None or src.kind == "tiny":             # weights not pinned by a file
        for t in model.state_dict().values():
            h.update(t.detach().float().numpy().tobytes())
    return cache_dir() / "omniquant-resume" / h.hexdigest()[:20]


@register("omniquant", OmniQuantConfig, suite=SUITE)
def omniquant(model: nn.Module, calib: torch.Tensor, cfg: OmniQuantConfig, progress: bool = True) -> nn.Module:
    if calib is None:
        raise SlmquantError("omniquant needs calibration windows")
    amap, hq = arch_map(model), heads(model)
    resume = _resume_dir(model, calib, cfg)
    state = capture_layer_inputs(model, calib)
    fp_in, q_in = state.hidden, [x.clone() for x in state.hidden]
    info = {"loss": {}, "nonfinite_blocks": [], "resumed_blocks": 0, "let": cfg.use_let}
    layers = decoder_layers(model)
    bar = tqdm(total=len(layers), desc="omniquant", unit="block", disable=not progress)
    for i, layer in enumerate(layers):
        kw = state.layer_kwargs[i]
        target, act_max = float_pass(layer, amap, fp_in, kw)
        blk = Block(layer, act_max, cfg, amap, hq)
        saved = resume / f"block{i}.pt"
        target_q = None
        if cfg.aug_loss and not saved.exists():
            with torch.no_grad():
                target_q = [layer(x, **kw) for x in q_in]          # the float block, quantized stream
        if cfg.quant_attn:                  # after the float pass: its targets stay float
            attn.install(model, layer.get_submodule(amap.v_o.prev.rpartition(".")[0]), cfg.a_spec)
        if saved.exists():
            ck = torch.load(saved, weights_only=True)
            blk.load(ck["state"])
            res = ck["result"]
            info["resumed_blocks"] += 1
        else:
            res = train_block(layer, blk, q_in, kw, target, cfg, target_q)
            saved.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(saved) as tmp:
                torch.save({"state": blk.state(), "result": res}, tmp)
        info["loss"][i] = res["loss"]
        if res["nonfinite"]:
            info["nonfinite_blocks"].append(i)
        fold_block_(layer, blk, cfg, quantize=cfg.weights == "rtn")
        if cfg.weights == "gptq":
            gptq_block_(layer, blk, q_in, kw, cfg)
        with torch.no_grad():
            q_in = [layer(x, **kw) for x in q_in]                    # the quantized stream moves on
        fp_in = target
        bar.update(1)
        if res["loss"]:
            bar.set_postfix(loss=f"{res['loss'][-1]:.3g}")
    bar.close()
    for f in resume.glob("block*.pt"):
        f.unlink()
    resume.rmdir() if resume.exists() else None
    model.slmquant_method_info = info
    return model
