"""Cached perplexity measurements. A whole-model WikiText-2 score costs minutes on a CPU, so each
one is kept on disk under a key that hashes what it depends on: the model state (a cell's cache key,
itself a hash of the model source, every setting and the quantizer's code, or the float model's
source and dtype), the scoring windows, the token ids, the scoring code, and the torch version.
Change any of them and the measurement is taken again; the CLI and the slow test tier share it."""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
import transformers
from filelock import FileLock

from . import evaluate
from .files import write_text_atomic
from .models import cache_dir, device_name


def float_key(model) -> str:
    """The model-state key of an unquantized model."""
    return f"float:{model.slmquant_source.key}:{model.dtype}:{device_name()}"


class MeasureCache:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else cache_dir() / "measurements"
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(model_key: str, tokens: torch.Tensor, seqlen: int, limit, sample_seed) -> str:
        payload = {"model": model_key, "tokens": evaluate.tokens_digest(tokens), "seqlen": seqlen,
                   "limit": str(limit), "sample_seed": sample_seed, "code": evaluate.scoring_code_hash(),
                   "torch": torch.__version__, "transformers": transformers.__version__,
                   "device": device_name()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]

    def wikitext2(self, model_key: str, load: Callable[[], torch.nn.Module], tokens: torch.Tensor,
                  seqlen: int = evaluate.SEQLEN, limit=None, sample_seed: int | None = None,
                  progress: bool = True, refresh: bool = False) -> dict:
        """PPLResult as a dict plus eval_s and from_cache; `load()` is called only on a miss."""
        key = self.key(model_key, tokens, seqlen, limit, sample_seed)
        path = self.root / f"ppl-{key}.json"
        with FileLock(str(path.with_suffix(".lock"))):
            res = None if refresh else self._read(path, key, "ppl")
            if res is not None:
                return res
            derived = self._prefix_of_all(model_key, tokens, seqlen, limit, sample_seed)
            if derived is not None:
                return derived
            model = load()
            t0 = time.perf_counter()
            r = evaluate.perplexity(model, tokens, seqlen=seqlen, limit=limit, sample_seed=sample_seed,
                                    progress=progress)
            res = {**r.to_dict(), "eval_s": round(time.perf_counter() - t0, 2), "key": key,
                   "model_key": model_key}
            self._write(path, res)
            return {**res, "from_cache": False}

    def _prefix_of_all(self, model_key, tokens, seqlen, limit, sample_seed) -> dict | None:
        """The first N windows are a prefix of a full-test-set measurement: derive them from its
        per-window NLL instead of scoring them again (the windows are identical)."""
        if sample_seed is not None or limit in (None, "all"):
            return None
        path = self.root / f"ppl-{self.key(model_key, tokens, seqlen, 'all', None)}.json"
        try:
            full = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        n = min(int(limit), full["n_windows"])
        if len(full.get("window_nll", [])) != full["n_windows"]:
            return None
        nll = full["window_nll"][:n]
        return {"ppl": math.exp(sum(nll) / (n * (seqlen - 1))), "nll_sum": sum(nll), "n_tokens": n * (seqlen - 1),
                "n_windows": n, "seqlen": seqlen, "windows": f"first:{n}", "extra": {}, "window_nll": nll,
                "eval_s": 0.0, "key": self.key(model_key, tokens, seqlen, limit, sample_seed),
                "model_key": model_key, "derived_from": full["key"], "from_cache": True}

    def scores(self, kind: str, model_key: str, tokens: torch.Tensor, seqlen: int, limit,
               compute: Callable[[], dict], code: str = "") -> dict:
        """A measurement other than perplexity (the test gate's KL against a float reference, say),
        computed by `compute()` on a miss and kept under the same kind of key; `code` holds what its
        computation depends on beyond the scoring code (a hash of the caller's source)."""
        key = self.key(f"{model_key}|{kind}|{code}", tokens, seqlen, limit, None)
        path = self.root / f"{kind}-{key}.json"
        with FileLock(str(path.with_suffix(".lock"))):
            res = self._read(path, key, "model_key")
            if res is not None:
                return res
            res = {**compute(), "key": key, "model_key": model_key}
            self._write(path, res)
            return {**res, "from_cache": False}

    @staticmethod
    def task_key(model_key: str, task: str, settings) -> str:
        from dataclasses import asdict
        from . import tasks as T
        payload = {"model": model_key, "task": task, "settings": asdict(settings),
                   "sources": T.sources_digest(task), "code": T.code_hash(), "lm_eval": T.lm_eval_version(),
                   "torch": torch.__version__}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]

    def tasks(self, model_key: str, load: Callable[[], tuple], tasks: list[str], settings,
              refresh: bool = False) -> dict[str, dict]:
        """Multiple-choice task results (TaskResult dicts plus from_cache), one cache file per task;
        `load()` -> (model, tokenizer) is called only when some task is missing."""
        from . import tasks as T
        keys = {t: self.task_key(model_key, t, settings) for t in tasks}
        out: dict[str, dict] = {}
        with FileLock(str(self.root / f"tasks-{hashlib.sha256(model_key.encode()).hexdigest()[:16]}.lock")):
            for t, key in keys.items():
                res = None if refresh else self._read(self.root / f"task-{key}.json", key, "acc_norm")
                if res is not None:
                    out[t] = res
            missing = [t for t in tasks if t not in out]
            if missing:
                model, tok = load()
                t0 = time.perf_counter()
                got = T.evaluate_tasks(model, tok, missing, settings)
                took = round(time.perf_counter() - t0, 2)
                for t, r in got.items():
                    res = {**r.to_dict(), "eval_s": took, "key": keys[t], "model_key": model_key}
                    self._write(self.root / f"task-{keys[t]}.json", res)
                    out[t] = {**res, "from_cache": False}
        return {t: out[t] for t in tasks}

    @staticmethod
    def _read(path: Path, key: str, field: str) -> dict | None:
        """A cached measurement, or None when absent, corrupt or for another key (measured again)."""
        try:
            res = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return {**res, "from_cache": True} if res.get("key") == key and field in res else None

    @staticmethod
    def _write(path: Path, res: dict) -> None:
        write_text_atomic(path, json.dumps(res))
