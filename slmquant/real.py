"""Real low-bit models (track 2): every fake-quantized linear of a cell becomes a RealLinear that
stores its weights as integers (int8; 4-bit codes packed two a byte) with float32 scales and
integer zero points, and computes through an integer kernel where one exists.

A cell's QLinear keeps its weights dequantized, on the grid of its weight spec. `codes.grid_of`
recovers the integer codes from those values exactly and refuses weights that are not on such a
grid, so nothing is rounded twice and a real model computes what its fake-quantized cell computes.

Kernels, recorded per module (`RealLinear.kernel`) and per model (`kernel_paths`):
- "onednn_u8s8" / "onednn_u7x2" (CPU, 8-bit per-token activations, symmetric or asymmetric): oneDNN's int8 matmul
  (`torch.ops.onednn.qlinear_pointwise`, weights prepacked at first use; 4-bit weights are unpacked
  to int8 for it, so W4A8 runs with W8's memory and W4's storage). CPUs without VNNI sum u8 x s8
  pairs in saturating int16: exact for 4-bit weights, not for 8-bit ones, which take "u7x2": the
  activations split into two 7-bit halves, one call with twice the rows (exact, about twice the work).
- "int_mm": `torch._int_mm` (int8 x int8 -> int32, exact): CUDA, and CPU builds without oneDNN (there
  a slow reference loop).
- "dequant": weights unpacked and dequantized on every call, a float matmul (W4A16, group-wise
  grids, activations other than 8-bit).
Every integer path applies the activation and weight scales after the integer sums and corrects
asymmetric zero points (weights per row, activations per token) with row sums.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attn import AttnInputQuant
from .codes import grid_of, pack4, unpack4
from .errors import SlmquantError
from .files import atomic_path
from .quant import QLinear, QSpec, fake_quant
from .rotation import fht
from .quant import quantize as int_quantize

KERNELS = ("onednn_u8s8", "onednn_u7x2", "int_mm", "dequant")


VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags, read once: every RealLinear built asks for its default kernel."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((frozenset(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")),
                        frozenset())
    except OSError:
        return frozenset()


def _has_vnni() -> bool:
    """CPUs whose int8 dot products accumulate in int32 (VNNI, AMX): oneDNN's u8 x s8 is exact.
    torch's capability string says only "AVX512" on a VNNI CPU, so /proc/cpuinfo's flags decide first."""
    cap = torch.backends.cpu.get_cpu_capability().upper()
    return bool(_cpu_flags() & VNNI_FLAGS) or "VNNI" in cap or "AMX" in cap


class RealLinear(nn.Module):
    """Integer weights (codes, scale, zero) and dynamic activation quantization. Buffers:
    `qweight` (int8 (out, in) codes - 2^(bits-1) for 8-bit; uint8 (out, in/2) packed codes for 4-bit),
    `scale` (float32 (out, n_groups)), `zero` (int16 (out, n_groups), in code units), `bias`, and
    for groups that are not runs of consecutive channels `g_idx` (int32 (in,): each channel's group)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, w_spec: QSpec, a_spec: QSpec | None,
                 kernel: str | None = None, device=None, g_idx: bool = False, had: int | None = None):
        super().__init__()
        self.had = had                            # online Hadamard of the input (SpinQuant's R4)
        if w_spec.bits not in (4, 8):
            raise SlmquantError(f"real models store 4- or 8-bit weights, got {w_spec.bits}")
        self.in_features, self.out_features, self.w_spec, self.a_spec = in_features, out_features, w_spec, a_spec
        groups = in_features // w_spec.group_size if w_spec.group_size else 1
        width = in_features if w_spec.bits == 8 else in_features // 2
        self.register_buffer("qweight", torch.zeros(out_features, width, device=device,
                                                    dtype=torch.int8 if w_spec.bits == 8 else torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, groups, device=device))
        self.register_buffer("zero", torch.zeros(out_features, groups, dtype=torch.int16, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        if g_idx and w_spec.granularity != "group":
            raise SlmquantError(f"a group index needs a group-wise weight spec, got {w_spec}")
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, device=device) if g_idx else None)
        self.kernel = kernel or self.default_kernel(w_spec, a_spec, str(self.qweight.device))
        if self.kernel not in KERNELS:
            raise SlmquantError(f"kernel {self.kernel!r}: choose from {', '.join(KERNELS)}")
        if self.kernel != "dequant" and groups > 1:
            raise SlmquantError(f"kernel {self.kernel!r} takes one weight scale per row; {w_spec} needs 'dequant'")
        self._packed = None                       # oneDNN's prepacked int8 weight, built at first use

    @staticmethod
    def default_kernel(w_spec: QSpec, a_spec: QSpec | None, device: str = "cpu") -> str:
        per_channel = w_spec.granularity in ("channel", "token")
        if a_spec is None or a_spec.bits != 8 or not per_channel:
            return "dequant"
        if device.startswith("cuda") or not torch.backends.mkldnn.is_available():
            return "int_mm"                       # torch._int_mm: 40x slower than float on an AVX2 CPU
        # 4-bit weights keep u8 x s8 pairs inside int16 (255 * 8 * 2): one exact pass on any x86
        return "onednn_u8s8" if w_spec.bits <= 4 or _has_vnni() else "onednn_u7x2"

    @classmethod
    @torch.no_grad()
    def from_qlinear(cls, q: QLinear, kernel: str | None = None) -> "RealLinear":
        if q.w_spec is None:
            raise SlmquantError("a QLinear with float weights has nothing to store as integers")
        g_idx = getattr(q, "g_idx", None)
        if g_idx is None:
            u, scale, zero = grid_of(q.weight, q.w_spec)
        else:                                     # gather each group's channels, recover, put back
            order = torch.argsort(g_idx, stable=True)
            expected = torch.arange(q.in_features, device=g_idx.device) // q.w_spec.group_size
            if not torch.equal(g_idx[order].long(), expected):
                raise SlmquantError(f"g_idx does not give every group {q.w_spec.group_size} channels")
            u, scale, zero = grid_of(q.weight[:, order], q.w_spec)
            u = u[:, torch.argsort(order)]
        m = cls(q.in_features, q.out_features, q.bias is not None, q.w_spec, q.a_spec, kernel,
                device=q.weight.device, g_idx=g_idx is not None, had=getattr(q, "had", None))
        if g_idx is not None:
            m.g_idx.copy_(g_idx)
        half = 2 ** (q.w_spec.bits - 1)
        m.qweight.copy_((u.to(torch.int16) - half).to(torch.int8) if q.w_spec.bits == 8 else pack4(u))
        m.scale.copy_(scale)
        m.zero.copy_(zero)
        if q.bias is not None:
            m.bias.copy_(q.bias.float())
        return m

    def int8_weight(self) -> torch.Tensor:
        """Codes minus 2^(bits-1), as int8 (out, in): W = (w8 - zero8) * scale, zero8 = zero - 2^(bits-1)."""
        if self.w_spec.bits == 8:
            return self.qweight
        return (unpack4(self.qweight).to(torch.int8) - 8)

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        half = 2 ** (self.w_spec.bits - 1)
        w = self.int8_weight().to(torch.float32)
        if self.g_idx is not None:
            g = self.g_idx.long()
            return ((w - (self.zero[:, g].to(torch.float32) - half)) * self.scale[:, g]).to(dtype)
        g = w.reshape(self.out_features, self.scale.shape[1], -1)
        zero8 = (self.zero.to(torch.float32) - half).unsqueeze(-1)
        return ((g - zero8) * self.scale.unsqueeze(-1)).reshape(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.had is not None:
            x = fht(x)
        if self.kernel == "dequant":
            return F.linear(fake_quant(x, self.a_spec), self.dequantized(x.dtype),
                            None if self.bias is None else self.bias.to(x.dtype))
        if self.kernel.startswith("onednn"):
            return self._onednn(x)
        return self._int_mm(x)

    def runtime_bytes(self) -> int:
        """Memory held beyond the module's buffers: oneDNN's prepacked int8 weight (built at the
        first call; 4-bit weights are unpacked to int8 for it) and its row sums."""
        if self._packed is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self._packed, self._wsum, self._wz))

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None
        return super()._load_from_state_dict(*args, **kwargs)

    def _onednn(self, x: torch.Tensor) -> torch.Tensor:
        """8-bit activations through oneDNN's u8 x s8 int8 matmul, on u = the codes as 0..255 (symmetric:
        q + 128; asymmetric: the uint8 codes, each token's zero point z). Without VNNI (AVX2) the
        u8 x s8 pairs are summed in saturating int16, which is exact only for 7-bit activations: the
        "u7x2" path splits u = 2 * hi + lo (hi in 0..127, lo in 0..1) and runs both halves as one
        call with twice the rows. Either gives sum (u - 128) w; the zero points of activations
        (asymmetric: z - 128 per token) and of weights (asymmetric grids) are corrected with the row
        sums, in float64 for asymmetric activations (their correction is large and cancels)."""
        if self._packed is None:
            w8 = self.int8_weight().contiguous()
            self._packed = torch.ops.onednn.qlinear_prepack(w8, None)
            self._wsum = w8.float().sum(-1)                                                # (N,)
            self._wz = (self.zero[:, 0].float() - 2 ** (self.w_spec.bits - 1))           # (N,)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        q, xs, xz = int_quantize(x2, self.a_spec)                     # int8 (sym) or uint8 codes, (M, 1)
        u = (q.to(torch.int16) + 128).to(torch.uint8) if self.a_spec.sym else q
        ones = torch.ones(self.out_features)
        zeros = torch.zeros(self.out_features, dtype=torch.int64)
        if self.kernel == "onednn_u8s8":
            acc = torch.ops.onednn.qlinear_pointwise(u, 1.0, 128, self._packed, ones, zeros, None, 1.0, 0,
                                                     torch.float32, "none", [], "")
        else:
            hi = torch.div(u, 2, rounding_mode="floor")
            out = torch.ops.onednn.qlinear_pointwise(torch.cat((hi, u - 2 * hi)), 1.0, 0, self._packed, ones, zeros,
                                                     None, 1.0, 0, torch.float32, "none", [], "")
            m = q.shape[0]
            acc = 2 * out[:m] + out[m:] - 128 * self._wsum
        if self.a_spec.sym:                                           # sum (u - 128)(w - zw)
            if self._wz.any():
                acc = acc - q.float().sum(-1, keepdim=True) * self._wz
            y = acc * xs * self.scale[:, 0]
        else:                                                         # sum (u - z)(w - zw)
            z, wz = xz.double(), self._wz.double()
            acc = (acc.double() + (128 - z) * self._wsum.double()
                   - (u.double().sum(-1, keepdim=True) - shape[-1] * z) * wz)
            y = (acc * xs.double() * self.scale[:, 0].double()).float()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def _int_mm(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xq, xs, xz = int_quantize(x2.float(), self.a_spec)          # per token: (M, K), (M, 1), (M, 1)
        if not self.a_spec.sym:                                     # uint8 codes -> int8, zero shifted
            xq, xz = (xq.to(torch.int16) - 128).to(torch.int8), xz - 128
        w8 = self.int8_weight()
        acc = torch._int_mm(xq.contiguous(), w8.t().contiguous()).to(torch.float64)   # exact int32 sums
        zw = (self.zero[:, 0].to(torch.float64) - 2 ** (self.w_spec.bits - 1))       # (N,)
        if self.a_spec.sym and not zw.any():
            y = acc
        else:
            k = x2.shape[-1]
            rx = xq.to(torch.float64).sum(-1, keepdim=True)                         # (M, 1)
            cw = w8.to(torch.float64).sum(-1)                                        # (N,)
            zx = xz.to(torch.float64)
            y = acc - zw * rx - zx * cw + k * zx * zw
        y = (y * xs.to(torch.float64) * self.scale[:, 0].to(torch.float64)).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def meta(self) -> dict:
        from dataclasses import asdict
        return {"type": "RealLinear", "in": self.in_features, "out": self.out_features,
                "bias": self.bias is not None, "w_spec": asdict(self.w_spec),
                "a_spec": asdict(self.a_spec) if self.a_spec else None, "kernel": self.kernel,
                **({"g_idx": True} if self.g_idx is not None else {}),
                **({"had": self.had} if self.had is not None else {})}

    @classmethod
    def from_meta(cls, meta: dict, device=None) -> "RealLinear":
        return cls(meta["in"], meta["out"], meta["bias"], QSpec(**meta["w_spec"]),
                   QSpec(**meta["a_spec"]) if meta["a_spec"] else None, meta["kernel"], device=device,
                   g_idx=meta.get("g_idx", False), had=meta.get("had"))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, W={self.w_spec}, "
                f"A={self.a_spec or 'float'}, kernel={self.kernel}")


class Int8Embedding(nn.Module):
    """Token embeddings as int8 codes with one float32 scale per row (symmetric, per token row)."""

    def __init__(self, num: int, dim: int, device=None):
        super().__init__()
        self.register_buffer("codes", torch.zeros(num, dim, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(num, device=device))

    @classmethod
    @torch.no_grad()
    def from_embedding(cls, emb: nn.Embedding) -> "Int8Embedding":
        m = cls(emb.num_embeddings, emb.embedding_dim, device=emb.weight.device)
        q, scale, _ = int_quantize(emb.weight.float(), QSpec(8, True, "channel"))
        m.codes.copy_(q)
        m.scale.copy_(scale.squeeze(-1))
        return m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.codes).to(torch.float32) * self.scale[ids].unsqueeze(-1)

    def meta(self) -> dict:
        return {"type": "Int8Embedding", "num": self.codes.shape[0], "dim": self.codes.shape[1]}


class Int8TiedHead(nn.Module):
    """The LM head tied to an Int8Embedding: the same codes and scales. Two paths (`path`):
    "int8pack": weight-only int8 through `torch.ops.aten._weight_int8pack_mm` (float activations,
    int8 weights, per-row scales; the int8 codes are all it holds); "dequant": the rows dequantized
    once, at the first call, to a float32 weight (float speed, float memory for the head). The
    default takes int8pack on CUDA only: its CPU kernel measured 22x slower than the float32 matmul
    at 128 tokens on AVX2, and on an AVX-512 VNNI CPU the whole W8A8 model prefilled at 0.17x float
    with it, so CPUs take dequant (README, track 2)."""

    PATHS = ("int8pack", "dequant")

    def __init__(self, emb: Int8Embedding, path: str | None = None):
        super().__init__()
        self.emb = [emb]                          # not a submodule: its buffers are saved once
        self.path = path or self.default_path(str(emb.codes.device))
        if self.path not in self.PATHS:
            raise SlmquantError(f"LM head path {self.path!r}: choose from {', '.join(self.PATHS)}")
        self._w = None

    @staticmethod
    def default_path(device: str = "cpu") -> str:
        if device.startswith("cuda"):
            return "int8pack"
        return "dequant"

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        emb = self.emb[0]
        shape = h.shape
        x = h.reshape(-1, shape[-1]).float()
        if self.path == "int8pack":
            y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), emb.codes, emb.scale)
        else:
            if self._w is None:
                self._w = emb.codes.to(torch.float32) * emb.scale.unsqueeze(-1)
            y = F.linear(x, self._w)
        return y.reshape(*shape[:-1], -1).to(h.dtype)

    def runtime_bytes(self) -> int:
        """The float32 weight the dequant path keeps after its first call."""
        return 0 if self._w is None else self._w.numel() * self._w.element_size()

    def meta(self) -> dict:
        return {"type": "Int8TiedHead"}


EMBEDDINGS = ("float16", "int8")


@torch.no_grad()
def to_real(model: nn.Module, kernel: str | None = None, embeddings: str = "float16") -> nn.Module:
    """Replace every QLinear of a quantized cell (in place) by a RealLinear and round what stays in
    floating point (embeddings, norms, an untied LM head) through float16, the storage format; with
    embeddings="int8", the token embeddings become int8 rows and a tied LM head shares them."""
    from .arch import set_submodule
    if embeddings not in EMBEDDINGS:
        raise SlmquantError(f"embeddings {embeddings!r}: choose from {', '.join(EMBEDDINGS)}")
    names = [n for n, m in model.named_modules() if isinstance(m, QLinear) and m.w_spec is not None]
    if not names:
        raise SlmquantError("no quantized linear layers: real models are built from quantized cells")
    for name in names:
        set_submodule(model, name, RealLinear.from_qlinear(model.get_submodule(name), kernel))
    for p in model.parameters():
        p.copy_(p.to(torch.float16).to(p.dtype))
    model.slmquant_real = {"embeddings": "float16", "kernels": kernel_paths(model)}
    return int8_embeddings_(model) if embeddings == "int8" else model


@torch.no_grad()
def int8_embeddings_(model: nn.Module) -> nn.Module:
    """A real model with float16 embeddings (to_real's default) given int8 token embeddings, in place:
    int8 rows, a tied LM head sharing them, an untied head as an int8 per-channel linear."""
    from .arch import arch_map, set_submodule
    if getattr(model, "slmquant_real", {}).get("embeddings") != "float16":
        raise SlmquantError("int8 embeddings are made from a real model with float16 embeddings (to_real)")
    amap = arch_map(model)
    emb = Int8Embedding.from_embedding(model.get_submodule(amap.embed))
    set_submodule(model, amap.embed, emb)
    if model.config.tie_word_embeddings:
        set_submodule(model, amap.lm_head, Int8TiedHead(emb))
    else:
        head = model.get_submodule(amap.lm_head)
        q = QLinear.from_linear(head, QSpec(8, True, "channel"), None)
        set_submodule(model, amap.lm_head, RealLinear.from_qlinear(q, "dequant"))
    model.slmquant_real = {"embeddings": "int8", "kernels": kernel_paths(model)}
    return model


def state_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of a real model once (a tied LM head is not repeated), floats as float16."""
    out, modules = {}, dict(model.named_modules())
    for name, t in unique_tensors(model.state_dict().items()):
        keep = isinstance(modules.get(name.rsplit(".", 1)[0]), (RealLinear, Int8Embedding))
        out[name] = t.contiguous() if keep or not t.is_floating_point() else t.to(torch.float16).contiguous()
    return out


def storage(model: nn.Module) -> dict:
    """Bytes a real (or float) model takes as saved: tied tensors counted once; the token
    embeddings (and an untied LM head) apart."""
    from .arch import arch_map
    amap = arch_map(model)
    state = state_to_save(model) if any(isinstance(m, RealLinear) for m in model.modules()) else {
        k: v.to(torch.float16) for k, v in unique_tensors(model.state_dict().items()) if v.is_floating_point()}
    emb = sum(v.numel() * v.element_size() for k, v in state.items()
              if k.startswith(amap.embed + ".") or k.startswith(amap.lm_head + "."))
    total = sum(v.numel() * v.element_size() for v in state.values())
    return {"bytes": total, "embedding_bytes": emb, "bytes_without_embeddings": total - emb}


def unique_tensors(named):
    """(name, tensor) pairs with tensors that share storage (tied weights) kept once, first name wins."""
    seen = set()
    for name, t in named:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            yield name, t


def kernel_paths(model: nn.Module) -> dict[str, int]:
    """kernel name -> number of RealLinear modules using it; an int8 tied LM head adds
    "lm_head_<path>"."""
    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, RealLinear):
            out[m.kernel] = out.get(m.kernel, 0) + 1
        elif isinstance(m, Int8TiedHead):
            out[f"lm_head_{m.path}"] = out.get(f"lm_head_{m.path}", 0) + 1
    return out


def measure_key(cell_key: str, model: nn.Module) -> str:
    """The measurement-cache key of a cell scored as this real model: the cell's key plus how its
    embeddings are stored and which kernels ran (a different path is a different measurement)."""
    paths = ",".join(f"{k}={v}" for k, v in sorted(kernel_paths(model).items()))
    return f"{cell_key}:real:{model.slmquant_real['embeddings']}:{paths}"


FILE = "model.safetensors"


def save_real(model: nn.Module, tokenizer, folder, record: dict | None = None) -> dict:
    """Write a real model (tensors once, floats as float16, integer weights as stored) with its
    config, module layout and record in the safetensors metadata, and the tokenizer beside it.
    Returns the storage figures."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layout = {n: m.meta() for n, m in model.named_modules()
              if isinstance(m, (RealLinear, Int8Embedding, Int8TiedHead, AttnInputQuant))}
    meta = {"config": model.config.to_dict(), "modules": layout, "real": getattr(model, "slmquant_real", {}),
            "record": record or {}}
    with atomic_path(folder / FILE) as tmp:
        save_file(state_to_save(model), str(tmp), metadata={"slmquant": json.dumps(meta, default=str)})
    tokenizer.save_pretrained(str(folder))
    return {**storage(model), "file_bytes": (folder / FILE).stat().st_size}


@torch.no_grad()
def load_real(folder, device: str = "cpu") -> tuple[nn.Module, object]:
    """(model, tokenizer) from a folder written by save_real: one call, no float weights needed."""
    import json
    from pathlib import Path

    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .arch import arch_map, set_submodule
    folder = Path(folder)
    path = folder / FILE
    if not path.is_file():
        raise SlmquantError(f"no real model at {folder}: {FILE} is missing (write one with save_real)")
    with safe_open(str(path), "pt", device=device) as f:
        meta = json.loads(f.metadata()["slmquant"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    cfg = dict(meta["config"])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).to(device).eval()
    amap = arch_map(model)
    for name, m in meta["modules"].items():
        if m["type"] == "RealLinear":
            set_submodule(model, name, RealLinear.from_meta(m, device=device))
        elif m["type"] == "Int8Embedding":
            set_submodule(model, name, Int8Embedding(m["num"], m["dim"], device=device))
        elif m["type"] == "AttnInputQuant":                  # rounded attention inputs (OmniQuant; SpinQuant's KV cache and R3)
            set_submodule(model, name, q := AttnInputQuant.from_meta(m))
            q.after_install(model)
    for name, m in meta["modules"].items():
        if m["type"] == "Int8TiedHead":
            set_submodule(model, name, Int8TiedHead(model.get_submodule(amap.embed)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {f"{amap.lm_head}.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise SlmquantError(f"{path}: does not match its layout (missing {sorted(set(missing) - tied)[:5]}, "
                            f"unexpected {unexpected[:5]})")
    model.slmquant_real = {**meta["real"], "kernels": kernel_paths(model)}
    model.slmquant_record = meta["record"]
    return model, AutoTokenizer.from_pretrained(str(folder))
