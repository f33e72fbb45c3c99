"""Sampling and shaping for the builder, all in bounded memory: validation split, shuffle, mixing.

Validation split (stratified by kind, deterministic for a seed and input order):
- `--val_ratio r`: streaming. Per kind, a record goes to validation with probability equal to the
  kind's current deficit `r * seen - in_val` (clamped to [0, 1]), so each kind's validation count
  stays within 1 of `r * count` at every point, positions are random, and memory is O(kinds).
- `--val_size n`: per kind, the n records with the smallest seeded random keys are held back (a heap);
  at the end each kind gets its largest-remainder share of n, the rest go to train. Memory is at most
  n records per kind.

Shuffle (`--shuffle`):
- exact, for local plain .jsonl / one-object-per-line .json files: a first pass indexes the byte
  offset and line of every record (14 bytes per record), the index is permuted with the seed and the
  records are read back by seeking. With --limit this is a uniform random sample.
- otherwise (.gz, JSON arrays, parquet, hub): a bounded shuffle buffer of --shuffle_buffer records
  (approximate: a record moves at most that far from its position).
"""
from __future__ import annotations

import heapq
import random
from typing import Iterable, Iterator

import numpy as np
import orjson

from sft.data.sources import (
    RawRecord,
    is_line_based,
    iter_raw_records,
    local_kind,
    parse_error,
)


class RatioSplitter:
    def __init__(self, ratio: float, seed: int):
        self.ratio, self.rng = ratio, random.Random(seed)
        self.seen: dict[str, int] = {}
        self.val: dict[str, int] = {}

    def add(self, kind: str, item) -> Iterator[tuple[bool, object]]:
        seen = self.seen[kind] = self.seen.get(kind, 0) + 1
        in_val = self.val.get(kind, 0)
        deficit = self.ratio * seen - in_val
        to_val = deficit >= 1 or (deficit > 0 and self.rng.random() < deficit)
        if to_val:
            self.val[kind] = in_val + 1
        yield to_val, item

    def finish(self) -> Iterator[tuple[bool, object]]:
        return iter(())


class SizeSplitter:
    def __init__(self, size: int, seed: int):
        self.size, self.rng = size, random.Random(seed)
        self.heaps: dict[str, list] = {}
        self.counts: dict[str, int] = {}
        self._tie = 0

    def add(self, kind: str, item) -> Iterator[tuple[bool, object]]:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        heap = self.heaps.setdefault(kind, [])
        self._tie += 1
        entry = (-self.rng.random(), self._tie, item)  # max-heap on the random key
        if len(heap) < self.size:
            heapq.heappush(heap, entry)
        elif entry[0] > heap[0][0]:
            yield False, heapq.heapreplace(heap, entry)[2]
        else:
            yield False, item

    def quotas(self) -> dict[str, int]:
        total = sum(self.counts.values())
        if total <= self.size:
            raise ValueError(f"--val_size {self.size} is not smaller than the {total} records written; "
                             "lower --val_size or use --val_ratio")
        exact = {k: self.size * n / total for k, n in self.counts.items()}
        quota = {k: int(v) for k, v in exact.items()}
        left = self.size - sum(quota.values())
        for k in sorted(exact, key=lambda k: (quota[k] - exact[k], k))[:left]:
            quota[k] += 1
        return quota

    def finish(self) -> Iterator[tuple[bool, object]]:
        quota = self.quotas()
        for kind, heap in self.heaps.items():
            # smallest random keys first (keys are stored negated), in arrival order within each side
            ranked = sorted(heap, key=lambda e: -e[0])
            chosen = {e[1] for e in ranked[:quota[kind]]}
            for e in sorted(heap, key=lambda e: e[1]):
                yield e[1] in chosen, e[2]


def make_splitter(val_ratio: float | None, val_size: int | None, seed: int):
    if val_ratio:
        return RatioSplitter(val_ratio, seed)
    if val_size:
        return SizeSplitter(val_size, seed)
    return None


# ------------------------------------------------------------------------------------ shuffle
def can_shuffle_exactly(paths: list[str]) -> bool:
    """Exact shuffling needs seekable JSON-lines files: local, line-based, not compressed."""
    return all(is_line_based(p) and not local_kind(p)[1] for p in paths)


def index_lines(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Byte offset and 1-based line number of every non-blank line."""
    offsets, lines = [], []
    pos = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                offsets.append(pos)
                lines.append(lineno)
            pos += len(line)
    return np.array(offsets, dtype=np.uint64), np.array(lines, dtype=np.uint32)


def exact_shuffled_records(paths: list[str], seed: int) -> Iterator[RawRecord]:
    """All records of `paths` (plain JSON-lines files) in a seeded random order."""
    index = [index_lines(p) for p in paths]
    file_of = np.concatenate([np.full(len(o), i, dtype=np.uint16) for i, (o, _) in enumerate(index)])
    row_of = np.concatenate([np.arange(len(o), dtype=np.uint32) for o, _ in index])
    order = np.random.default_rng(seed).permutation(len(file_of))
    handles = [open(p, "rb") for p in paths]
    try:
        for k in order:
            i, r = int(file_of[k]), int(row_of[k])
            f = handles[i]
            f.seek(int(index[i][0][r]))
            raw = f.readline()
            line = int(index[i][1][r])
            try:
                yield RawRecord(paths[i], line, orjson.loads(raw), raw)
            except orjson.JSONDecodeError as e:
                yield RawRecord(paths[i], line, None, raw, parse_error(raw, e))
    finally:
        for f in handles:
            f.close()


def buffer_shuffled(records: Iterable, buffer: int, seed: int) -> Iterator:
    """Approximate shuffle with a bounded buffer (reservoir-style replacement)."""
    rng = random.Random(seed)
    buf = []
    for rec in records:
        if len(buf) < buffer:
            buf.append(rec)
            continue
        j = rng.randrange(buffer)
        yield buf[j]
        buf[j] = rec
    rng.shuffle(buf)
    yield from buf


def shuffled_raw_records(paths: list[str], seed: int, buffer: int, **source_kw) -> tuple[Iterator[RawRecord], str]:
    """(records in shuffled order, "exact" | "buffer")."""
    if can_shuffle_exactly(paths):
        return exact_shuffled_records(paths, seed), "exact"
    chained = (rec for p in paths for rec in iter_raw_records(p, **source_kw))
    return buffer_shuffled(chained, buffer, seed), "buffer"


# ------------------------------------------------------------------------------------ mixing
def mix_targets(main_count: int, ratios: list[float]) -> list[int]:
    """How many records each mixed-in set must contribute so that set i is ratios[i] of the total."""
    rest = 1.0 - sum(ratios)
    total = main_count / rest if rest > 0 else 0
    return [round(r * total) for r in ratios]


def interleave(streams: list[Iterator], counts: list[int], seed: int) -> Iterator:
    """Merge streams into one uniformly random interleaving (each stream keeps its order)."""
    rng = random.Random(seed)
    left = list(counts)
    total = sum(left)
    while total:
        pick = rng.randrange(total)
        for i, n in enumerate(left):
            if pick < n:
                break
            pick -= n
        left[i] -= 1
        total -= 1
        yield next(streams[i])
