"""Duplicate detection for the builder: exact (normalized-text hash) and near (MinHash LSH).

A record's *location* is packed into one int, `source_index << 40 | line`, so that the exact index keeps
one 8-byte hash -> one 8-byte location per kept record in flat arrays (CompactHashIndex, ~35 MB for
1.1M unique records) and a duplicate can name the original it repeats.

Normalization for both: the system prompt, every role + content, tool calls and tools, joined with
NUL separators, runs of whitespace collapsed to one space. Meta (kind, id) is ignored:
the same conversation under two kinds is still a duplicate.
"""
from __future__ import annotations

import hashlib
import json
from array import array

import numpy as np
import orjson

from sft.conversation import Conversation

_LINE_BITS = 40


def pack_location(source_index: int, line: int) -> int:
    return (source_index << _LINE_BITS) | line


def unpack_location(loc: int) -> tuple[int, int]:
    return loc >> _LINE_BITS, loc & ((1 << _LINE_BITS) - 1)


def normalized_text(conv: Conversation) -> str:
    parts = [conv.system or ""]
    for m in conv.messages:
        parts.append(m.role)
        parts.append(m.content)
        if m.tool_calls:
            parts.append(_sorted_json([[c.name, c.arguments] for c in m.tool_calls]))
    if conv.tools:
        parts.append(_sorted_json(conv.tools))
    # Each part on its own (so that leading/trailing blanks vanish); joined with NUL, not \x1f:
    # str.split() treats \x1c-\x1f as whitespace.
    return "\x00".join([" ".join(p.split()) for p in parts])


def _sorted_json(value) -> str:
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except orjson.JSONEncodeError:  # nested past orjson's 255 levels: Python's json writes what the output holds
        return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def text_hash(text: str) -> int:
    """64-bit BLAKE2b digest of the text, never 0 (0 marks an empty slot in CompactHashIndex)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") or 1


class CompactHashIndex:
    """hash -> location in two flat arrays (open addressing, linear probing): 16 bytes per slot,
    at most 70% full, so ~25-45 bytes per kept record instead of ~120 in a dict (~35 MB for 1.1M)."""

    def __init__(self, capacity: int = 1 << 16):
        self._alloc(capacity)
        self.size = 0

    def _alloc(self, capacity: int) -> None:
        self.keys = array("Q", bytes(8 * capacity))
        self.values = array("Q", bytes(8 * capacity))
        self.mask = capacity - 1
        self.limit = int(capacity * 0.7)

    def setdefault(self, key: int, value: int) -> int | None:
        """Store value for key unless present; return the stored value if it was present, else None."""
        keys, mask = self.keys, self.mask
        i = key & mask
        while True:
            k = keys[i]
            if k == key:
                return self.values[i]
            if k == 0:
                break
            i = (i + 1) & mask
        keys[i] = key
        self.values[i] = value
        self.size += 1
        if self.size > self.limit:
            self._grow()
        return None

    def _grow(self) -> None:
        old_keys, old_values = self.keys, self.values
        self._alloc(2 * (self.mask + 1))
        self.size = 0
        for k, v in zip(old_keys, old_values):
            if k:
                self.setdefault(k, v)


class ExactDeduper:
    """Remembers one 8-byte hash per kept record; `check` returns the original's location or None."""

    def __init__(self) -> None:
        self.seen = CompactHashIndex()

    def check_hash(self, h: int, loc: int) -> int | None:
        return self.seen.setdefault(h, loc)

    def check(self, text: str, loc: int) -> int | None:
        return self.seen.setdefault(text_hash(text), loc)


class NearDeduper:
    """MinHash over character 5-grams + datasketch's MinHashLSH. Candidates are not re-verified
    against the original text (that would mean storing every signature): a duplicate is any earlier
    record whose LSH bands collide, which datasketch tunes for Jaccard >= `threshold`."""

    def __init__(self, threshold: float = 0.85, num_perm: int = 128, shingle: int = 5, seed: int = 1):
        from datasketch import (  # heavy import (scipy): only when asked for
            MinHash,
            MinHashLSH,
        )

        self._minhash = MinHash
        self.template = MinHash(num_perm=num_perm, seed=seed, hashfunc=_identity)
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.num_perm, self.shingle, self.seed = num_perm, shingle, seed

    def signature(self, text: str):
        m = self._minhash(num_perm=self.num_perm, seed=self.seed, hashfunc=_identity,
                          permutations=self.template.permutations, scheme=self.template.scheme)
        m.update_batch(shingle_hashes(text, self.shingle))
        return m

    def check(self, text: str, loc: int) -> int | None:
        sig = self.signature(text)
        hits = self.lsh.query(sig)
        if hits:
            return min(hits)
        self.lsh.insert(loc, sig, check_duplication=False)
        return None


def _identity(x):
    return x


_MULT = np.uint64(1000003)  # polynomial rolling hash; uint64 arithmetic wraps mod 2**64, on purpose


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """32-bit hashes of the distinct character n-grams of `text` (the whole text if shorter)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(codes) < n:
        n = max(len(codes), 1)
        codes = codes if len(codes) else np.zeros(1, dtype=np.uint64)
    windows = len(codes) - n + 1
    h = np.zeros(windows, dtype=np.uint64)
    for k in range(n):
        h = h * _MULT + codes[k:k + windows]
    h ^= h >> np.uint64(29)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    return np.unique((h >> np.uint64(32)).astype(np.uint32))
