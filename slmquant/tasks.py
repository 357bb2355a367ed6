"""Track 1's multiple-choice tasks through lm-evaluation-harness, offline, on the model object in
memory (float or quantized).

The verified data files (slmquant.data) are converted once into JSONL documents that carry their
prompt already built (`query`, `choices`, `gold`), with a local YAML task per file (`dataset_path:
json`); lm-eval reads them through a TaskManager that sees these tasks only (no Hub, no built-in
task index). Prompts mirror the official definitions:

- arc_easy, arc_challenge: "Question: {question}\\nAnswer:", the choice texts (lm-eval's ai2_arc);
- piqa: "Question: {goal}\\nAnswer:", [sol1, sol2] (lm-eval's piqa);
- hellaswag: lm-eval's preprocessing of "{activity_label}: {ctx}" and of the endings (the llama.cpp
  file keeps ctx_a and ctx_b joined, so `ctx_b.capitalize()` cannot be redone: see data.py);
- mmlu_cloze: "The following are questions about {subject}.\\nQuestion: {question}\\nAnswer:", the
  choice texts: the cloze form of the SmolLM2 team's evaluation, the MMLU of slmq_perf;
- mmlu: lm-eval's letter form (subject description, question, "A. ..." lines, "Answer:", choices
  A-D); informational (near chance at 135M).

Seeded subsets (`limit`) are drawn here, not by lm-eval (whose limit takes the first N): a
sample of N item indices from random.Random(seed), the same for every cell, written as its own JSONL.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import data
from .errors import SlmquantError
from .files import atomic_path

TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "mmlu_cloze", "mmlu")
PER_ITEM = ("doc_ids", "correct", "correct_norm", "lls")     # per-item fields of a TaskResult
FORMAT_VERSION = 1                                  # bump when a prompt changes: new cache folder


@dataclass(frozen=True)
class TaskSettings:
    """Everything that moves a score, recorded with every result."""
    batch_size: int = 16
    max_length: int = 2048
    add_bos_token: bool = False
    num_fewshot: int = 0
    seed: int = 1234                    # item sample and lm-eval's own seeds
    limit: int | None = None            # None: the whole set

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise SlmquantError(f"limit must be a positive number of items or None, got {self.limit}")


def _hellaswag_clean(text: str) -> str:
    """lm-eval's hellaswag preprocessing (WikiHow bracket artifacts)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def documents(task: str, root: Path | None = None) -> list[dict]:
    """Every item of a task as a prompt-ready document: id, query, choices, gold."""
    if task in ("arc_easy", "arc_challenge", "piqa"):
        recs = data.TASK_LOADERS[task](root)
        return [{"id": r.id, "query": f"Question: {r.context}\nAnswer:", "choices": list(r.choices),
                 "gold": r.gold} for r in recs]
    if task == "hellaswag":
        return [{"id": r.id, "query": _hellaswag_clean(r.context),
                 "choices": [_hellaswag_clean(c) for c in r.choices], "gold": r.gold}
                for r in data.load_hellaswag(root)]
    if task in ("mmlu", "mmlu_cloze"):
        out = []
        for r in data.load_mmlu("test", root):
            topic = r.meta["subject"].replace("_", " ")
            if task == "mmlu_cloze":
                query = f"The following are questions about {topic}.\nQuestion: {r.context}\nAnswer:"
                choices = list(r.choices)
            else:
                lines = "".join(f"\n{l}. {c}" for l, c in zip("ABCD", r.choices))
                query = (f"The following are multiple choice questions (with answers) about {topic}.\n\n"
                         f"{r.context.strip()}{lines}\nAnswer:")
                choices = ["A", "B", "C", "D"]
            out.append({"id": r.id, "query": query, "choices": choices, "gold": r.gold,
                        "subject": r.meta["subject"]})
        return out
    raise SlmquantError(f"unknown task {task!r}; known: {', '.join(TASKS)} (and wikitext2)")


def sample_indices(n: int, limit: int | None, seed: int) -> list[int]:
    """A seeded sample of `limit` of n item indices, in order; every index when limit is None."""
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))


def sources_digest(task: str) -> str:
    rels = {"arc_easy": ["arc_easy/"], "arc_challenge": ["arc_challenge/"], "piqa": ["piqa/"],
            "hellaswag": ["hellaswag/"], "mmlu": ["mmlu/test/"], "mmlu_cloze": ["mmlu/test/"]}[task]
    shas = sorted(v["sha256"] for k, v in data.CHECKSUMS.items() if any(k.startswith(r) for r in rels))
    return hashlib.sha256(json.dumps([task, FORMAT_VERSION, shas]).encode()).hexdigest()[:16]


YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: multiple_choice
test_split: test
doc_to_text: query
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
"""


def task_folder(tasks: list[str], settings: TaskSettings, root: Path | None = None,
                cache: Path | None = None) -> tuple[Path, dict[str, list[int]]]:
    """JSONL documents (the seeded sample) and one YAML per task, in a cache folder named by the
    source checksums, the prompt format version, the limit and the seed. Returns the folder and
    the item indices used per task."""
    from .models import cache_dir
    base = Path(cache) if cache else cache_dir() / "tasks"
    used: dict[str, list[int]] = {}
    digest = hashlib.sha256(json.dumps([[sources_digest(t) for t in tasks], settings.limit,
                                        settings.seed]).encode()).hexdigest()[:16]
    folder = base / digest
    folder.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        jsonl, yaml, idx_file = folder / f"{task}.jsonl", folder / f"{task}.yaml", folder / f"{task}.idx.json"
        if not (jsonl.is_file() and yaml.is_file() and idx_file.is_file()):
            docs = documents(task, root)
            idx = sample_indices(len(docs), settings.limit, settings.seed)
            with atomic_path(jsonl) as tmp, open(tmp, "w", encoding="utf-8") as f:
                for i in idx:
                    f.write(json.dumps(docs[i], ensure_ascii=False) + "\n")
            idx_file.write_text(json.dumps(idx))
            yaml.write_text(YAML.format(task=task, path=json.dumps(str(jsonl)), version=FORMAT_VERSION))
        used[task] = json.loads(idx_file.read_text())
    return folder, used


@dataclass
class TaskResult:
    task: str
    acc: float
    acc_stderr: float
    acc_norm: float
    acc_norm_stderr: float
    n_items: int
    settings: dict = field(default_factory=dict)
    # per item, in sample order: the item's index in the whole set, whether acc / acc_norm chose the
    # gold answer, and the loglikelihood of every choice (paired comparisons between cells use them)
    doc_ids: list[int] = field(default_factory=list)
    correct: list[int] = field(default_factory=list)
    correct_norm: list[int] = field(default_factory=list)
    lls: list[list[float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_tasks(model, tokenizer, tasks: list[str], settings: TaskSettings = TaskSettings(),
                   root: Path | None = None) -> dict[str, TaskResult]:
    """Run lm-eval's loglikelihood multiple choice on `model` (already loaded, float or quantized)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SlmquantError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)} (and wikitext2)")
    import numpy as np
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    folder, used = task_folder(tasks, settings, root)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size,
              max_length=settings.max_length, add_bos_token=settings.add_bos_token)
    tm = TaskManager(include_path=str(folder), include_defaults=False)
    # lm-eval's own evaluate(): what simple_evaluate() does for a model object, without its
    # environment report (a pip subprocess, seconds per call); seeds and 0-shot set here
    random.seed(settings.seed)
    np.random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    loaded = tm.load(list(tasks))
    for task_obj in loaded["tasks"].values():
        task_obj.set_config(key="num_fewshot", value=settings.num_fewshot)
        task_obj.set_fewshot_seed(seed=settings.seed)
    out = evaluate(lm=lm, task_dict=loaded, log_samples=True, verbosity="ERROR")
    record = {**asdict(settings), "lm_eval": lm_eval_version()}
    results = {}
    for task in tasks:
        r = out["results"][task]
        samples = sorted(out["samples"][task], key=lambda x: x["doc_id"])
        results[task] = TaskResult(
            task, r["acc,none"], r["acc_stderr,none"], r["acc_norm,none"], r["acc_norm_stderr,none"],
            len(used[task]), record, doc_ids=[used[task][x["doc_id"]] for x in samples],
            correct=[int(x["acc"]) for x in samples], correct_norm=[int(x["acc_norm"]) for x in samples],
            lls=[[float(f"{ll:.6g}") for ll, _ in x["filtered_resps"]] for x in samples])
    return results


def lm_eval_version() -> str:
    from importlib.metadata import version
    return version("lm_eval")


def code_hash() -> str:
    """This module's source: prompts and scoring conventions live here."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
