"""Rotations for SpinQuant-style methods (arXiv 2405.16406): Hadamard matrices of every order the
models need, generated (Sylvester for powers of two, Paley I and II for the small factor K of
n = K * 2^m), random-sign Hadamards and random orthogonal matrices, an online fast Hadamard
transform, and the function-preserving model surgery: untying tied embeddings, fusing RMSNorm
weights into the linears that read them (float64), and rotating the residual stream (R1) and each
layer's value/output heads (R2, GQA-consistent, Qwen2's v bias included) and down_proj's input (R4).

Conventions: a linear computes y = x W^T with row vectors x. Rotating a stream x -> x R (R
orthogonal) is undone in a reader by W -> W R and carried by a writer by W -> R^T W, b -> b R.
No embedding centering: it is not function-preserving for RMSNorm models (SPINQUANT.md, section 1)."""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn as nn

from .arch import arch_map, decoder_layers, heads
from .errors import SlmquantError

ROTATABLE = ("llama", "qwen2")


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, math.isqrt(p) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) over GF(q), q prime: the quadratic character (0 on the diagonal)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley(k: int) -> torch.Tensor | None:
    """A Hadamard matrix of order k from Paley's constructions, or None: Paley I for k = q + 1 with
    q prime, q = 3 mod 4 (H = I + S, S skew); Paley II for k = 2(q + 1) with q prime, q = 1 mod 4
    (the symmetric conference matrix C with 0 -> [[1, -1], [-1, -1]], +-1 -> +-[[1, 1], [1, -1]])."""
    q = k - 1
    if _is_prime(q) and q % 4 == 3:
        S = torch.zeros(k, k, dtype=torch.float64)
        S[0, 1:], S[1:, 0], S[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return torch.eye(k, dtype=torch.float64) + S
    q = k // 2 - 1
    if k % 2 == 0 and _is_prime(q) and q % 4 == 1:
        C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        C[0, 1:], C[1:, 0], C[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(C, one) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)
    return None


def _sylvester(m: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(m):
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


@lru_cache(maxsize=None)
def factor(n: int) -> tuple[int, int]:
    """(K, 2^m) with n = K * 2^m and a Hadamard matrix of order K constructible here (K = 1 for a
    power of two), the smallest such K. 576 = 36 * 16, 896 = 28 * 32, 1536 = 12 * 128,
    4864 = 76 * 64 (the order-76 matrix the reference code lacks for Qwen2.5-0.5B's MLP)."""
    p = 1
    while n % (2 * p) == 0:
        p *= 2
    while p >= 1:
        k = n // p
        if k in (1, 2) or _paley(k) is not None:
            return k, p
        p //= 2
    raise SlmquantError(f"no Hadamard matrix of order {n} here: {n} is not K * 2^m with K = q + 1 "
                        "or 2(q + 1) for a prime q")


@lru_cache(maxsize=None)
def _hadamard(n: int) -> torch.Tensor:
    k, p = factor(n)
    Hk = _sylvester(1) if k == 2 else (torch.ones(1, 1, dtype=torch.float64) if k == 1 else _paley(k))
    return torch.kron(Hk, _sylvester(p.bit_length() - 1))


def hadamard(n: int) -> torch.Tensor:
    """H (n, n) with entries +-1 and H H^T = n I, float64: H_K (x) H_{2^m}."""
    return _hadamard(n).clone()


def random_hadamard(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """An orthogonal (n, n) float64 matrix D H / sqrt(n), D a diagonal of random signs (the
    reference's R1/R2 start)."""
    d = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
    return d[:, None] * _hadamard(n) / math.sqrt(n)


def random_orthogonal(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Haar-random orthogonal (n, n) float64 matrix: QR of a Gaussian with the signs of R's
    diagonal moved into Q."""
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))[None, :]


def orthogonality_error(R: torch.Tensor) -> float:
    """max |R^T R - I| (0 for an orthogonal matrix)."""
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    return float((R.T @ R - eye).abs().max())


def fht(x: torch.Tensor) -> torch.Tensor:
    """x (..., n) -> x H^T / sqrt(n) (each row transformed by H / sqrt(n)), in the input's dtype
    (computed in at least float32). With n = K * 2^m and H = H_K (x) H_{2^m}, a row viewed as a
    (K, 2^m) matrix X becomes H_K X H_{2^m}^T: two small matmuls (K^2 + 4^m per K * 2^m values)
    instead of one n^2 product; a butterfly did the same work in more, slower elementwise passes."""
    n = x.shape[-1]
    k, p = factor(n)
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    Hk, Hp = _factors(n, dt, x.device)
    y = x.to(dt).reshape(*x.shape[:-1], k, p) @ Hp.T
    if k > 1:
        y = Hk @ y
    return y.reshape(x.shape).to(x.dtype)


@lru_cache(maxsize=None)
def _factors(n: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(H_K, H_{2^m} / sqrt(n)) for fht, built once per order, dtype and device."""
    k, p = factor(n)
    Hk = _sylvester(1) if k == 2 else (_paley(k) if k > 2 else torch.ones(1, 1, dtype=torch.float64))
    return Hk.to(dtype=dtype, device=device), (_sylvester(p.bit_length() - 1) / math.sqrt(n)).to(dtype=dtype, device=device)


def check_rotatable(model: nn.Module) -> None:
    mt = model.config.model_type
    if mt not in ROTATABLE:
        raise SlmquantError(
            f"rotations support {', '.join(ROTATABLE)}, not {mt!r}"
            + (": Gemma 3's post-attention and post-feedforward norms sit between o/down and the residual "
               "stream, so a residual rotation does not fold into the weights exactly" if mt == "gemma3_text" else ""))


@torch.no_grad()
def untie_embeddings_(model: nn.Module) -> bool:
    """Give the LM head its own copy of tied embeddings, before anything else changes them (the
    embedding is rotated once, the head once, and the head also takes the final norm's weight).
    Returns whether they were tied."""
    amap = arch_map(model)
    emb, head = model.get_submodule(amap.embed), model.get_submodule(amap.lm_head)
    tied = head.weight.data_ptr() == emb.weight.data_ptr()
    if tied:
        head.weight = nn.Parameter(emb.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return tied


@torch.no_grad()
def fuse_norm_(norm: nn.Module, linears: list[nn.Linear]) -> None:
    """RMSNorm weight g folded into the linears that read its output (W -> W diag(g), float64), g
    set to 1: the function is unchanged, and the norm now commutes with a rotation of its input."""
    g = norm.weight.double()
    for lin in linears:
        lin.weight.copy_((lin.weight.double() * g[None, :]).to(lin.weight.dtype))
    norm.weight.fill_(1.0)


@torch.no_grad()
def fuse_norms_(model: nn.Module) -> None:
    """Every layer's input norm into q/k/v, pre-MLP norm into gate/up, the final norm into the LM
    head (untie first)."""
    check_rotatable(model)
    amap = arch_map(model)
    for layer in decoder_layers(model):
        for b in (amap.attn_in, amap.mlp_in):
            fuse_norm_(layer.get_submodule(b.prev), [layer.get_submodule(n) for n in b.linears])
    fuse_norm_(model.get_submodule(amap.final_norm), [model.get_submodule(amap.lm_head)])


def _rotate_in(lin: nn.Linear, R: torch.Tensor) -> None:
    """A reader of the rotated stream: W -> W R."""
    lin.weight.copy_((lin.weight.double() @ R).to(lin.weight.dtype))


def _rotate_out(lin: nn.Linear, R: torch.Tensor) -> None:
    """A writer into the rotated stream: W -> R^T W, b -> b R."""
    lin.weight.copy_((R.T @ lin.weight.double()).to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_((lin.bias.double() @ R).to(lin.bias.dtype))


@torch.no_grad()
def rotate_residual_(model: nn.Module, R1: torch.Tensor) -> None:
    """R1 (hidden, hidden) on the residual stream: embeddings E -> E R1, every reader (q/k/v,
    gate/up, LM head) W -> W R1, every writer (o, down) W -> R1^T W. Norms must be fused first
    (an RMSNorm with weight 1 commutes with an orthogonal R1: |x R1| = |x|)."""
    amap = arch_map(model)
    emb, head = model.get_submodule(amap.embed), model.get_submodule(amap.lm_head)
    if emb.weight.data_ptr() == head.weight.data_ptr():
        raise SlmquantError("untie the embeddings first (untie_embeddings_): a tied embedding would "
                            "be rotated twice, once as the embedding and once as the LM head")
    R1 = R1.to(device=emb.weight.device, dtype=torch.float64)
    emb.weight.copy_((emb.weight.double() @ R1).to(emb.weight.dtype))
    for layer in decoder_layers(model):
        for n in amap.attn_in.linears + amap.mlp_in.linears:
            _rotate_in(layer.get_submodule(n), R1)
        for n in (amap.v_o.linears[0], amap.up_down.linears[0]):
            _rotate_out(layer.get_submodule(n), R1)
    _rotate_in(model.get_submodule(amap.lm_head), R1)


@torch.no_grad()
def rotate_heads_(model: nn.Module, layer: nn.Module, R2: torch.Tensor) -> None:
    """R2 (head_dim, head_dim) on one layer's value heads: each kv head's v rows W_v[h] -> R2^T W_v[h]
    and bias b_v[h] -> b_v[h] R2 (Qwen2), and o's input columns of every query head W_o[:, h] ->
    W_o[:, h] R2. Attention mixes tokens, not channels, so (attn v_h) R2 = attn (v_h R2): GQA's
    repeated kv heads stay consistent because every head shares R2."""
    amap, (n_q, n_kv, hd) = arch_map(model), heads(model)
    v, o = layer.get_submodule(amap.v_o.prev), layer.get_submodule(amap.v_o.linears[0])
    R2 = R2.to(device=v.weight.device, dtype=torch.float64)
    Wv = v.weight.double().view(n_kv, hd, -1)
    v.weight.copy_(torch.einsum("dc,hdi->hci", R2, Wv).reshape(v.weight.shape).to(v.weight.dtype))
    if v.bias is not None:
        v.bias.copy_((v.bias.double().view(n_kv, hd) @ R2).reshape(-1).to(v.bias.dtype))
    Wo = o.weight.double().view(o.weight.shape[0], n_q, hd)
    o.weight.copy_((Wo @ R2).reshape(o.weight.shape).to(o.weight.dtype))


@torch.no_grad()
def rotate_down_input_(down: nn.Linear) -> None:
    """R4's offline half: W_down -> W_down H^T / sqrt(n), so that down(fht(x)) = down(x); the online
    half is a QLinear's `had` (slmquant.quant)."""
    down.weight.copy_(fht(down.weight.double()).to(down.weight.dtype))
