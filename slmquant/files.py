"""Atomic writes: a file or folder appears complete under its name or not at all, so that a crash,
Ctrl-C or a second process never leaves a torn result, cache entry or checkpoint behind."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path | str):
    """Yield a temporary path beside `path` (unique to this process) to write a file or a folder
    into; when the block ends normally it replaces `path` (a folder already there is removed
    first), and when it raises, the temporary is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
