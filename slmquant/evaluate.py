"""Token-level WikiText-2 perplexity in the GPTQ/SmoothQuant convention (arXiv 2210.17323): the test
rows joined with "\\n\\n", tokenized once, cut into non-overlapping windows, exp(mean token NLL)."""
from __future__ import annotations

import hashlib
import inspect
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data
from .errors import SlmquantError

QUICK_WINDOWS = 40          # the quick profile's fixed subset: the first 40 windows of 2048 tokens
SEQLEN = 2048


@dataclass
class PPLResult:
    ppl: float
    nll_sum: float
    n_tokens: int           # tokens scored (each window predicts seqlen - 1 of its tokens)
    n_windows: int
    seqlen: int
    windows: str            # "all", "first:N" or "sample:N:seed=S"
    extra: dict = field(default_factory=dict)
    window_nll: list[float] = field(default_factory=list)   # NLL summed over each scored window

    def ppl_of_first(self, n: int) -> float:
        """Perplexity over the first n scored windows (each scores seqlen - 1 tokens)."""
        if not 1 <= n <= len(self.window_nll):
            raise SlmquantError(f"{n} windows asked, {len(self.window_nll)} scored")
        return math.exp(sum(self.window_nll[:n]) / (n * (self.seqlen - 1)))

    def to_dict(self) -> dict:
        return asdict(self)


_TOKENS: dict = {}


def wikitext2_tokens(tokenizer, split: str = "test", root: Path | None = None) -> torch.Tensor:
    """The token ids of the perplexity string (memoized per tokenizer in this process)."""
    key = (tokenizer.name_or_path, len(tokenizer), split, str(root))
    if key not in _TOKENS:
        _TOKENS[key] = data.tokenize_text(tokenizer, data.wikitext2_text(split, root))
    return _TOKENS[key]


def select_windows(n_total: int, limit: int | str | None, sample_seed: int | None = None) -> tuple[list[int], str]:
    """Window indices: all, the first `limit`, or (with sample_seed) a seeded sample of `limit`."""
    if limit in (None, "all"):
        return list(range(n_total)), "all"
    limit = int(limit)
    if limit < 1:
        raise SlmquantError(f"limit must be a positive number of windows or 'all', got {limit}")
    limit = min(limit, n_total)
    if sample_seed is None:
        return list(range(limit)), f"first:{limit}"
    g = torch.Generator().manual_seed(sample_seed)
    idx = sorted(torch.randperm(n_total, generator=g)[:limit].tolist())
    return idx, f"sample:{limit}:seed={sample_seed}"


@torch.no_grad()
def window_logits(model, tokens: torch.Tensor, seqlen: int, indices: list[int]):
    """Yield (window index, input ids (1, T), logits (1, T, V) in float32) one window at a time."""
    device = next(model.parameters()).device
    for i in indices:
        ids = tokens[i * seqlen:(i + 1) * seqlen].unsqueeze(0).to(device)
        yield i, ids, model(ids, use_cache=False).logits.float()


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seqlen: int = SEQLEN, limit: int | str | None = None,
               sample_seed: int | None = None, batch_size: int = 1, progress: bool = True,
               reference=None, sqnr: bool = True, stop_kl: float | None = None) -> PPLResult:
    """Perplexity of `model` on `tokens` (1-D) cut into windows of `seqlen`.

    reference: optional callable(window index) -> float logits of a reference model on that window;
    then the result's `extra` holds the mean KL(reference || model) and, with sqnr, the logit SQNR
    (dB): two float64 passes over every logit, a seventh of a SmolLM2 scoring at one thread, that a
    caller gating on the KL alone can leave out (the KL is the same either way).

    stop_kl (with reference): stop after the first window at which the KL summed so far, divided by
    the positions of every window asked for, exceeds it. KL is not negative at any position (up to
    float rounding: the reference is renormalized here, a float16 copy of it sums to 1 only within
    its rounding), so that quotient is a lower bound on the mean KL of all the windows:
    `extra["kl"]` is then that lower bound, `extra["stopped"]` True, and the perplexity and
    `window_nll` cover the windows scored."""
    n_total = tokens.numel() // seqlen
    if n_total == 0:
        raise SlmquantError(f"{tokens.numel()} tokens make no window of {seqlen}")
    if stop_kl is not None and reference is None:
        raise SlmquantError("stop_kl needs a reference model to measure the KL against")
    indices, label = select_windows(n_total, limit, sample_seed)
    device = next(model.parameters()).device
    nll, count, window_nll = torch.zeros((), dtype=torch.float64), 0, []
    sig, noise, kl, window_kl = 0.0, 0.0, 0.0, []
    bar = tqdm(total=len(indices), desc=f"wikitext2 ppl ({label}, {seqlen})", disable=not progress, unit="win")
    for b in range(0, len(indices), batch_size):
        chunk = indices[b:b + batch_size]
        ids = torch.stack([tokens[i * seqlen:(i + 1) * seqlen] for i in chunk]).to(device)   # (B, T)
        logits = model(ids, use_cache=False).logits.float()                                   # (B, T, V)
        logp = logits.log_softmax(-1)         # once, for the NLL and the KL (F.cross_entropy's own step)
        # token-level NLL of tokens 1..T-1 given their prefixes: -log softmax(logits)[next token]
        tok_nll = F.nll_loss(logp[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        per_window = tok_nll.double().view(len(chunk), -1).sum(1).cpu()
        window_nll += per_window.tolist()
        nll += per_window.sum()
        count += ids[:, 1:].numel()
        if reference is not None:
            for j, i in enumerate(chunk):
                ref = reference(i).to(logits.device)
                if sqnr:
                    sig += ref.double().pow(2).sum().item()
                    noise += (ref - logits[j]).double().pow(2).sum().item()
                window_kl.append(F.kl_div(logp[j], ref.log_softmax(-1), log_target=True,
                                          reduction="sum").item())
                kl += window_kl[-1]
        del logits, logp                      # not alive through the next window's forward pass
        bar.update(len(chunk))
        if stop_kl is not None and kl / (len(indices) * seqlen) > stop_kl:
            break
    bar.close()
    res = PPLResult(float(torch.exp(nll / count)), float(nll), count, len(window_nll), seqlen, label,
                    window_nll=window_nll)
    if reference is not None:
        res.extra = {"kl": kl / (len(indices) * seqlen), "window_kl": window_kl,
                     **({"stopped": True} if len(window_nll) < len(indices) else {})}
        if sqnr:
            res.extra["sqnr_db"] = 10 * torch.log10(torch.tensor(sig / max(noise, 1e-30))).item()
    return res


def tokens_digest(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.numpy().tobytes()).hexdigest()[:16]


def scoring_code_hash() -> str:
    """Hash of the code that turns a model into a perplexity: part of every cached measurement's key."""
    src = "".join(inspect.getsource(f) for f in (perplexity, select_windows, PPLResult))
    return hashlib.sha256(src.encode()).hexdigest()[:16]
