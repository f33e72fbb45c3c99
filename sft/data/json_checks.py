"""What JSON parsers let through or cannot write back, checked on a parsed record (builder and training).

    has_duplicate_keys(rec)      # {"a": 1, "a": 2}: every parser keeps the last value silently -> a quality flag
    too_deep_error(data, exc)    # RecordError("too_deep", ...) naming the field: orjson reads 1024 levels of
                                 # nesting but writes at most 255; Python's json stops near 1000
"""
from __future__ import annotations

import json
from typing import Any

from sft.conversation import RecordError
from sft.data.sources import RawRecord


class _DuplicateKey(Exception):
    pass


def _no_duplicate_pairs(pairs: list) -> dict:
    if len({k for k, _ in pairs}) != len(pairs):
        raise _DuplicateKey
    return dict(pairs)


def has_duplicate_keys(rec: RawRecord) -> bool:
    """True when a JSON object of the record's text repeats a key (JSON parsers keep the last one silently).

    Exact, and cheap for almost every record: (1) a text with no more ':' bytes than the parsed value has keys
    cannot hold a dropped key (each key is followed by one ':'); (2) else the text holds one '"' per quote
    character of the parsed value's strings (two around each, one per escaped quote inside) plus those of a
    dropped key, so equal counts mean none, unless the text spells a quote as \\u0022; (3) only otherwise
    is the text parsed again with a pairs hook. bench/bench_duplicate_keys.py measures the cost."""
    text = rec.raw_bytes
    if text is None or rec.data is None:
        return False  # parquet and hub rows come from structures without duplicate keys
    try:
        if text.count(b":") == (_keys(rec.data) if isinstance(rec.data, (dict, list)) else 0):
            return False
        if text.count(b'"') == _quotes(rec.data) and b"\\u0022" not in text:
            return False
        json.loads(text, object_pairs_hook=_no_duplicate_pairs)
    except _DuplicateKey:
        return True
    except (ValueError, RecursionError):  # too deep to walk or re-parse: not judged
        return False
    return False


def _keys(value: dict | list) -> int:
    """Number of object keys in a parsed JSON object or array."""
    n = 0
    if isinstance(value, dict):
        n = len(value)
        value = value.values()
    for v in value:  # a plain loop: no generator per call on the hot path
        if isinstance(v, (dict, list)):
            n += _keys(v)
    return n


def _quotes(value: Any) -> int:
    """'"' characters a JSON text of `value` holds (two per string, one per quote inside a string)."""
    if isinstance(value, str):
        return 2 + value.count('"')
    if isinstance(value, dict):
        return sum(4 + k.count('"') + (v.count('"') if isinstance(v, str) else _quotes(v) - 2)
                   for k, v in value.items())
    if isinstance(value, list):
        return sum(map(_quotes, value))
    return 0


def too_deep_error(data: Any, exc: Exception) -> RecordError:
    """The reject of a record that parsed but cannot be written back or rendered: orjson writes at most 255
    levels of nesting (it reads 1024), Python's json about 1000."""
    if not isinstance(exc, RecursionError) and "ecursion" not in str(exc):
        return RecordError("too_deep", f"the record cannot be written as JSON ({exc}); fix the field")
    depths = {k: _depth(v) for k, v in data.items()} if isinstance(data, dict) else {}
    deepest = max(depths, key=depths.get, default=None)
    if deepest is not None and depths[deepest] > 200:
        where = f"field '{deepest}' nests {depths[deepest]} levels"
    else:  # a JSON string field (ShareGPT's tools, function_call values) holding the deep value
        nested = [k for k, v in depths.items() if isinstance(data[k], str) and data[k][:1] in "[{"] if depths else []
        where = f"field '{nested[0]}' holds JSON nested too deep" if nested else "the record nests too deep"
    return RecordError("too_deep", f"{where}; JSON output allows at most 255 levels (orjson): flatten it, store it "
                                   "as a JSON string, or drop the field")


def _depth(value: Any) -> int:
    """Nesting depth of lists/dicts (iterative: deep values are the point)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            deepest = max(deepest, d)
            stack.extend((x, d + 1) for x in v)
    return deepest
