"""Atomic writes: a reader (an evaluator beside training, a resumed run) sees the old file or folder or
the whole new one, never a part. The one place that writes a temporary name and renames it.

    write_text_atomic("run/run_end.json", text)          # small text files (markers, states)
    with atomic_path("run/loss_curve.png") as tmp:        # anything a library writes to a path
        fig.savefig(tmp)
    with atomic_path("run/merged", folder=True) as tmp:   # folders (save_pretrained)
        model.save_pretrained(tmp)
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def temp_name(target: str | os.PathLike) -> Path:
    """The hidden temporary name beside `target` (same file system, so the rename is atomic)."""
    target = Path(target)
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_path(target: str | os.PathLike, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target` (file or folder), on any
    error it is removed and `target` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(target)
    _remove(tmp)  # left over from a killed writer of the same pid (pids are reused)
    try:
        yield tmp
        if not folder:
            _fsync_file(tmp)  # the content must reach the disk before the name does
        elif target.is_dir():
            # os.replace cannot replace a non-empty folder: move the old one aside first, then drop it.
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            _remove(old)
            os.replace(target, old)
            os.replace(tmp, target)
            _remove(old)
            return
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, value: Any, indent: int | None = None) -> None:
    write_text_atomic(path, json.dumps(value, ensure_ascii=False, indent=indent))
