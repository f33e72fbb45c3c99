"""The builder's per-record step, identical in-process and in worker processes.

    outcome = record_outcome(item, cfg)
      bad:  (False, line, reason, detail)
      good: (True, line, kind, is_plain_text, dedup_key, sharegpt_json_bytes, stats_features | None,
             has_duplicate_keys)

Everything after this step (dedup lookups, writing, counting) happens in the main process, in input
order, so the result is the same whatever the number of workers. Workers are used for local
JSON-lines inputs (the common, big case): the main process only cuts the file into chunks of raw lines
and sends them out, with a bounded number in flight so that memory does not grow with the input.
"""
from __future__ import annotations

import multiprocessing
import signal
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import orjson

from sft.conversation import is_plain_text
from sft.data.dedup import normalized_text, text_hash
from sft.data.formats import (
    LoadedRecord,
    conversation_to_sharegpt,
    detect_format,
    normalize_records,
)
from sft.data.json_checks import has_duplicate_keys, too_deep_error
from sft.data.sources import (
    RawRecord,
    iter_line_chunks,
    iter_raw_records,
    parse_json_lines,
)
from sft.data.stats import record_features


@dataclass(frozen=True)
class StepConfig:
    fmt: str | None  # forced format, or None: detect per file
    max_chars: int | None
    key: str  # dedup key to compute: "hash" (exact), "text" (near: the main process hashes), "none"
    stats: bool  # compute stats features


def record_kind(meta: dict) -> str:
    return str(meta.get("kind") or meta.get("category") or "-")


def record_outcome(item: LoadedRecord, cfg: StepConfig) -> tuple:
    if item.error is not None:
        return False, item.raw.line, item.error.reason, item.error.detail
    conv = item.conversation
    key = None
    try:
        out = orjson.dumps(conversation_to_sharegpt(conv))
        if cfg.key == "hash":
            key = text_hash(normalized_text(conv))
        elif cfg.key == "text":
            key = normalized_text(conv)
    except (orjson.JSONEncodeError, RecursionError) as e:  # orjson reads 1024 levels but writes at most 255
        err = too_deep_error(item.raw.data, e)
        return False, item.raw.line, err.reason, err.detail
    dup_keys = has_duplicate_keys(item.raw)
    features = record_features(conv) if cfg.stats else None
    if features is not None and dup_keys:
        features = features[:4] + (features[4] + ("duplicate_keys",),)
    return True, item.raw.line, record_kind(conv.meta), is_plain_text(conv), key, out, features, dup_keys


def first_format(path: str) -> tuple[str | None, int]:
    """(format, line) of the first recognizable record of a file: what per-file detection decides."""
    for raw in iter_raw_records(path):
        if raw.error is None:
            try:
                return detect_format(raw.data), raw.line
            except Exception:  # not recognizable: keep looking, as the in-process path does
                continue
    return None, 0


def process_chunk(task: tuple) -> list[tuple]:
    """Worker entry point: outcomes of one chunk of raw JSON lines."""
    source, first_line, lines, file_fmt, detect_line, cfg = task
    detected: dict[str, str] = {}

    def raws() -> Iterator[RawRecord]:
        for raw in parse_json_lines(lines, source, first_line):
            if file_fmt is not None and raw.line >= detect_line:
                detected[source] = file_fmt  # records before the detecting one are judged alone
            yield raw

    return [record_outcome(item, cfg) for item in normalize_records(raws(), cfg.fmt, cfg.max_chars, detected)]


def _worker_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # Pool.terminate() must stop us, whatever the parent set


def parallel_outcomes(paths: list[str], cfg: StepConfig, workers: int, read_limit: int | None,
                      formats: dict[str, str]) -> Iterator[tuple[tuple, str, bytes]]:
    """(outcome, source, raw line) for every record of line-based `paths`, in input order."""
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    pool = ctx.Pool(workers, initializer=_worker_signals)
    pending: deque = deque()
    try:
        for task in _tasks(paths, cfg, read_limit, formats):
            if isinstance(task, RawRecord):  # the unreadable rest of a file: its one reject, in order
                outcome = (False, task.line, task.error.reason, task.error.detail)
                pending.append((_Ready([outcome]), (task.source, task.line, [b""])))
            else:
                pending.append((pool.apply_async(process_chunk, (task,)), task))
            if len(pending) >= 2 * workers + 2:  # bounded: memory does not grow with the input
                yield from _finish(pending.popleft())
        while pending:
            yield from _finish(pending.popleft())
    finally:
        pool.terminate()
        pool.join()


class _Ready:
    """An outcome known without a worker, queued like a worker's result."""

    def __init__(self, outcomes: list[tuple]):
        self.outcomes = outcomes

    def get(self) -> list[tuple]:
        return self.outcomes


def _finish(entry) -> Iterator[tuple[tuple, str, bytes]]:
    result, (source, first_line, lines, *_rest) = entry
    for outcome in result.get():
        yield outcome, source, lines[outcome[1] - first_line]


def _tasks(paths: list[str], cfg: StepConfig, read_limit: int | None,
           formats: dict[str, str]) -> Iterator[tuple | RawRecord]:
    """Chunks of lines for the workers; a RawRecord (an "unreadable" reject) where a file cannot be read on."""
    left = read_limit
    for path in paths:
        file_fmt, detect_line = (None, 0) if cfg.fmt else first_format(path)
        if file_fmt is not None:
            formats[path] = file_fmt
        for first_line, lines in iter_line_chunks(path):
            if isinstance(lines, RawRecord):
                yield lines
                if left is not None:
                    left -= 1
                    if left == 0:
                        return
                continue
            if left is not None:
                lines, left = _cut_at_records(lines, left)
            if lines:
                yield path, first_line, lines, file_fmt, detect_line, cfg
            if left == 0:
                return


def _cut_at_records(lines: list[bytes], left: int) -> tuple[list[bytes], int]:
    """Keep lines up to the `left`-th non-blank one (blank lines are not records)."""
    for i, line in enumerate(lines):
        if line.strip():
            left -= 1
            if left == 0:
                return lines[:i + 1], 0
    return lines, left
