"""Offline evaluation data: checksum-verified files, the WikiText-2 strings, calibration windows,
and the multiple-choice tasks in one record shape. Layout and quirks: ../shared/data/MANIFEST.md."""
from __future__ import annotations

import bz2
import csv
import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from .errors import SlmquantError

DATA_ENV = "SLMQUANT_DATA"
# sha256 and size of every data file, copied from MANIFEST.md and checked against the files once.
CHECKSUMS: dict[str, dict] = json.loads((Path(__file__).with_name("data_sha256.json")).read_text())
# sha256 (UTF-8) of "\n\n".join(rows) of the test split: the GPTQ perplexity string (MANIFEST.md).
WIKITEXT2_TEST_STRING_SHA256 = "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"
WIKITEXT2_FILES = {"test": "wikitext2/wiki.test.raw", "validation": "wikitext2/wiki.valid.raw"}


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """The data directory: `override` (--data-dir), else $SLMQUANT_DATA, else ../shared/data beside
    the repository when it exists."""
    if override is not None:
        return Path(override).expanduser().resolve()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser().resolve()
    beside = Path(__file__).resolve().parents[2] / "shared" / "data"
    if beside.is_dir():
        return beside
    raise SlmquantError(
        f"no data directory: set {DATA_ENV} (or pass --data-dir) to the folder holding "
        "wikitext2/, arc_easy/, arc_challenge/, piqa/, hellaswag/ and mmlu/")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@lru_cache(maxsize=None)
def _verified(path: Path, size: int, mtime_ns: int) -> str:
    return _sha256(path)   # memoized per (path, size, mtime): a changed file is hashed again


def file_status(rel: str, root: Path) -> str:
    """'ok', 'missing' or 'corrupt' for one data file."""
    path = root / rel
    if not path.is_file():
        return "missing"
    st = path.stat()
    return "ok" if _verified(path, st.st_size, st.st_mtime_ns) == CHECKSUMS[rel]["sha256"] else "corrupt"


def verified_path(rel: str, root: Path | None = None) -> Path:
    """The path of a data file after checking its sha256; a clear error names a missing or corrupt file."""
    if rel not in CHECKSUMS:
        raise SlmquantError(f"{rel}: not a known data file")
    root = data_dir() if root is None else root
    status = file_status(rel, root)
    if status != "ok":
        raise SlmquantError(
            f"data file {root / rel} is {status}: expected sha256 {CHECKSUMS[rel]['sha256']} "
            f"({CHECKSUMS[rel]['size']} bytes); see MANIFEST.md in the data directory")
    return root / rel


def wikitext2_rows(split: str = "test", root: Path | None = None) -> list[str]:
    """The Hugging Face rows of wikitext-2-raw-v1: one a line, blank lines (' ') become ''."""
    if split not in WIKITEXT2_FILES:
        raise SlmquantError(f"wikitext2 split {split!r}: choose from {sorted(WIKITEXT2_FILES)}")
    with open(verified_path(WIKITEXT2_FILES[split], root), encoding="utf-8") as f:
        return [line if line.strip() else "" for line in f.readlines()]


def wikitext2_text(split: str = "test", root: Path | None = None) -> str:
    """The GPTQ/SmoothQuant perplexity string: the rows joined with two newlines."""
    return "\n\n".join(wikitext2_rows(split, root))


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """1-D LongTensor of the token ids of `text`, as one sequence (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calib_windows(tokenizer, n: int, seqlen: int, seed: int = 0, root: Path | None = None) -> torch.Tensor:
    """(n, seqlen) random windows from the calibration text, seeded. The paper calibrates on the
    WikiText-2 train split, which is not available offline: the validation split stands in."""
    ids = _calib_ids(tokenizer, root)
    if ids.numel() <= seqlen:
        raise SlmquantError(f"calibration text has {ids.numel()} tokens, fewer than seqlen={seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


_CALIB_CACHE: dict = {}


def _calib_ids(tokenizer, root):
    key = (tokenizer.name_or_path, len(tokenizer), str(root))
    if key not in _CALIB_CACHE:
        _CALIB_CACHE[key] = tokenize_text(tokenizer, wikitext2_text("validation", root))
    return _CALIB_CACHE[key]


# ---------------------------------------------------------------- multiple-choice tasks
@dataclass(frozen=True)
class Record:
    """One multiple-choice item: the context (question), the choice texts, the gold index."""
    id: str
    context: str
    choices: tuple[str, ...]
    gold: int
    meta: dict = field(default_factory=dict, compare=False, hash=False)


def load_arc_easy(root: Path | None = None) -> list[Record]:
    items = json.loads(verified_path("arc_easy/ARC-Easy-Test.json", root).read_text(encoding="utf-8"))
    # labels are A-E for most items and 1-4 for 97 of them: index by the label list, never int().
    return [Record(it["id"], it["question"], tuple(it["choices"]["text"]),
                   it["choices"]["label"].index(it["answerKey"])) for it in items]


def load_arc_challenge(root: Path | None = None) -> list[Record]:
    out = []
    with open(verified_path("arc_challenge/ARC-Challenge-Test.jsonl", root), encoding="utf-8") as f:
        for line in f:
            it = json.loads(line)
            labels = [o["label"] for o in it["options"]]
            out.append(Record(it["id"], it["question"], tuple(o["text"] for o in it["options"]),
                              labels.index(it["answer"])))
    return out


def load_piqa(root: Path | None = None) -> list[Record]:
    with open(verified_path("piqa/valid.jsonl", root), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    labels = verified_path("piqa/valid-labels.lst", root).read_text().split()
    if len(rows) != len(labels):
        raise SlmquantError(f"piqa: {len(rows)} rows but {len(labels)} labels")
    return [Record(f"piqa-{i}", r["goal"], (r["sol1"], r["sol2"]), int(y))
            for i, (r, y) in enumerate(zip(rows, labels))]


def load_hellaswag(root: Path | None = None) -> list[Record]:
    """llama.cpp's 6-line layout. lm-eval builds `label: ctx_a + " " + ctx_b.capitalize()`; only the
    joined ctx survives here, so the context is `label: ctx` (close to, not equal to, lm-eval's)."""
    with bz2.open(verified_path("hellaswag/hellaswag_val_full.txt.bz2", root), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[:-1]
    out = []
    for i in range(0, len(lines), 6):
        head, label, *endings = lines[i:i + 6]
        activity, ctx = head.split(": ", 1)
        out.append(Record(f"hellaswag-{i // 6}", f"{activity}: {ctx}", tuple(endings), int(label),
                          {"activity_label": activity}))
    return out


def load_mmlu(split: str = "test", root: Path | None = None) -> list[Record]:
    """All 57 subjects, header-less CSV: question, A, B, C, D, answer letter."""
    if split not in ("test", "dev"):
        raise SlmquantError(f"mmlu split {split!r}: choose 'test' or 'dev'")
    out = []
    for rel in sorted(k for k in CHECKSUMS if k.startswith(f"mmlu/{split}/")):
        subject = Path(rel).name.removesuffix(f"_{split}.csv")
        with open(verified_path(rel, root), encoding="utf-8", newline="") as f:
            for j, row in enumerate(csv.reader(f)):
                q, *choices, ans = row
                out.append(Record(f"{subject}-{j}", q, tuple(choices), "ABCD".index(ans.strip()),
                                  {"subject": subject}))
    return out


TASK_LOADERS = {
    "arc_easy": load_arc_easy,
    "arc_challenge": load_arc_challenge,
    "piqa": load_piqa,
    "hellaswag": load_hellaswag,
    "mmlu": load_mmlu,
}
