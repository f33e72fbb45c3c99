"""Read raw records from local files or a hub dataset, streaming, with file + line for every record.
The one reader of the project: the builder and the training stream both read through it.

    for rec in iter_raw_records("data/firefly.jsonl.gz"):
        rec.source, rec.line   # "data/firefly.jsonl.gz", 17
        rec.data               # the parsed JSON value (usually a dict); None when rec.error is set
        rec.error              # RecordError("invalid_json" / "invalid_utf8" / "bom", ...) or None
        rec.raw                # the record's text as read (for rejects files)
        rec.position           # where the record after this one starts (below)

    iter_raw_records(path, position=rec.position)   # continue right after `rec`, cheaply

A position is a small JSON-able dict, opaque to callers (a checkpoint stores it as is). "records" is
the number of records read so far; the rest says how to get there without parsing what lies before:

    {"records": n, "offset": byte, "line": l}      JSON lines and JSON arrays: seek to the byte (for a
                                                    .gz file an offset in the decompressed data: opening
                                                    there decompresses up to it once, parsing nothing)
    {"records": n, "row_group": g, "row": r}        parquet: row r of row group g
    {"records": n}                                  hub datasets (datasets' skip(n) when opened)

Supported: .jsonl/.ndjson, .json (an array, one object per line, or one pretty-printed object: one
record), .parquet, and any of them .gz
compressed; a hub dataset id ("owner/name") when it is not a local path. Memory does not grow with
the input: JSON lines are read line by line, a JSON array element by element (an incremental splitter,
below), parquet batch by batch, hub datasets through `datasets`' streaming mode.

A bad record never raises: it comes back with `error` set, so the caller can reject it with its line
number. Neither does a file whose rest cannot be read (a truncated or bad-CRC .gz, an I/O error, a corrupt
parquet page): what cannot be read comes back as ONE record with error "unreadable" naming where reading
stopped, and the reader goes on with the next readable part (the next parquet row group; for a byte
stream, the end of the file). Problems with a whole file (missing, unsupported type, hub unreachable, no
parquet footer) raise SourceError.
"""
from __future__ import annotations

import gzip
import itertools
import os
import re
import shutil
import zlib
import socket
import tempfile
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterable, Iterator
from urllib.parse import urlparse

import orjson

from sft.conversation import RecordError

BOM = b"\xef\xbb\xbf"
LOCAL_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")
_CHUNK = 1 << 20
# A JSON array element larger than this is taken as a broken file (e.g. an unterminated string that
# would otherwise make us buffer the rest of the file).
MAX_ELEMENT_BYTES = 256 << 20
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Failures of a file's bytes rather than of one record: a truncated .gz (EOFError), a bad CRC or header
# (gzip.BadGzipFile, an OSError), corrupt deflate data (zlib.error), a disk read error (OSError).
READ_ERRORS = (EOFError, OSError, zlib.error)


class SourceError(ValueError):
    """A whole input cannot be read (missing, unsupported, unreachable); the message says the fix."""


@dataclass(slots=True)
class RawRecord:
    source: str
    line: int  # 1-based line where the record starts (parquet / hub: 1-based row number)
    data: Any = None
    raw_bytes: bytes | None = None  # exact bytes read; None for parquet/hub rows (raw is re-dumped)
    error: RecordError | None = None
    position: dict | None = None  # where the next record starts: iter_raw_records(..., position=) resumes there

    @property
    def raw(self) -> str:
        if self.raw_bytes is None:
            try:
                return orjson.dumps(self.data, default=str, option=orjson.OPT_SERIALIZE_NUMPY).decode()
            except TypeError:  # nested deeper than orjson writes (255 levels)
                return repr(self.data)[:1 << 20]
        return self.raw_bytes.rstrip(b"\r\n").decode("utf-8", "backslashreplace")


def iter_raw_records(path: str, *, hub_split: str = "train", hub_config: str | None = None,
                     position: dict | None = None) -> Iterator[RawRecord]:
    """Yield the records of `path` (a local file or a hub dataset id) in order, from the start or from
    `position` (a RawRecord.position of an earlier read of the same input); see the module doc."""
    path = str(path)
    if os.path.exists(path):
        if os.path.isdir(path):
            raise SourceError(f"{path} is a directory; pass the data files inside it (e.g. {path}/*.jsonl)")
        if position is not None and set(position) == {"records"}:
            # A count only (a checkpoint written before positions had offsets): read up to it once.
            yield from itertools.islice(_iter_local(path, None), position["records"], None)
            return
        yield from _iter_local(path, position)
    elif looks_like_hub_id(path):
        yield from _iter_hub(path, hub_split, hub_config, position)
    else:
        raise SourceError(f"{path}: no such file (and it is not a hub dataset id like 'owner/name'); check the path")


def looks_like_hub_id(path: str) -> bool:
    return bool(_HUB_ID.match(path)) and not local_kind(path)[0] and not os.path.exists(path)


def local_kind(path: str) -> tuple[str | None, bool]:
    """(".jsonl" | ".json" | ".parquet" | None, gzipped?) from the file name."""
    name = path.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    for suffix in LOCAL_SUFFIXES:
        if name.endswith(suffix):
            return (".jsonl" if suffix == ".ndjson" else suffix), gz
    return None, gz


def _open_bytes(path: str, gz: bool) -> BinaryIO:
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _iter_local(path: str, position: dict | None) -> Iterator[RawRecord]:
    kind, gz = local_kind(path)
    if kind is None:
        raise SourceError(f"{path}: unsupported file type; use .jsonl, .json, .parquet (optionally .gz)")
    if kind == ".parquet":
        yield from _iter_parquet(path, gz, position)
        return
    if position is not None and position.get("end"):  # after a truncated array, trailing data, one object
        return
    last: RawRecord | None = None
    with _open_bytes(path, gz) as f:
        try:
            layout = _json_layout(f) if kind == ".json" else "lines"
            if layout == "object" and position is None:
                rec = _whole_object(f, path)
                if rec is not None:
                    yield rec
                    return
                f.seek(0)  # not one object after all: read it as JSON lines (each bad line a reject)
            if position is not None:
                f.seek(position["offset"])  # gzip: decompresses up to there, once per opening
            if layout == "array":
                records = _iter_json_array(f, path, position)
            elif position is None:
                records = _iter_json_lines(f, path)
            else:
                records = _iter_json_lines(f, path, position["line"] + 1, position["offset"], position["records"])
            for last in records:
                yield last
        except READ_ERRORS as e:
            yield _unreadable_rest(path, gz, last.position if last is not None else position, e)


def _unreadable_rest(path: str, gz: bool, at: dict | None, exc: BaseException) -> RawRecord:
    """The one reject that stands for everything after `at` (a position; None: the file's start)."""
    records, line, offset = (0, 0, 0) if at is None else (at["records"], at.get("line", 0), at.get("offset", 0))
    where = f"after line {line} (byte {offset}{' of the decompressed data' if gz else ''})" if line else "from its start"
    fix = ("the .gz file is truncated or corrupt: re-download or re-compress it (`gzip -t FILE` checks it)" if gz
           else "a read error: copy the file again and check the disk")
    why = str(exc) or type(exc).__name__
    return RawRecord(path, line + 1, None, b"", RecordError(
        "unreadable", f"cannot read the rest of {path} {where}: {why}; the records after it are skipped. Fix: {fix}"),
        {"records": records + 1, "end": True})


def _json_layout(f: BinaryIO) -> str:
    """"array", "object" (one pretty-printed object, e.g. axolotl's conversation.json) or "lines", from a peek.
    A JSON-lines file never has a first line that opens an object without closing it."""
    head = f.peek(4096) if hasattr(f, "peek") else b""
    head = head[len(BOM):] if head.startswith(BOM) else head
    body = head.lstrip()
    if body[:1] == b"[":
        return "array"
    first, newline, _ = body.partition(b"\n")
    if body[:1] == b"{" and newline and not _parses(first):
        return "object"
    return "lines"


def _whole_object(f: BinaryIO, source: str) -> RawRecord | None:
    """The file as one record when it holds one JSON value; None when it does not parse (then it is read as
    JSON lines). Files over MAX_ELEMENT_BYTES are never taken whole."""
    text = f.read(MAX_ELEMENT_BYTES + 1)
    if len(text) > MAX_ELEMENT_BYTES:
        return None
    bom = text.startswith(BOM)
    body = text[len(BOM):] if bom else text
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    line = 1 + body[:len(body) - len(body.lstrip())].count(b"\n")  # where the object opens
    rec = RawRecord(source, line, data, body.strip(), None, {"records": 1, "end": True})
    if bom:
        rec.error, rec.data = parse_error(BOM, ValueError()), None
    return rec


def is_line_based(path: str) -> bool:
    """True for a local JSON-lines file (.jsonl/.ndjson, or .json holding one object per line), .gz too:
    files that can be cut into chunks of lines and parsed anywhere (e.g. in worker processes)."""
    kind, gz = local_kind(path)
    if not os.path.isfile(path) or kind not in (".jsonl", ".json"):
        return False
    if kind == ".jsonl":
        return True
    try:
        with _open_bytes(path, gz) as f:
            return _json_layout(f) == "lines"
    except READ_ERRORS:  # a corrupt .gz: the record reader reports it (one "unreadable" reject)
        return False


def count_records(path: str) -> int:
    """Number of records of `path`: non-blank lines of a JSON-lines file (not parsed), else a full read."""
    if is_line_based(path):
        count = 0
        with _open_bytes(path, local_kind(path)[1]) as f:
            try:
                for line in f:
                    count += bool(line.strip())
            except READ_ERRORS:
                count += 1  # the reader's one "unreadable" record for the rest of the file
        return count
    return sum(1 for _ in iter_raw_records(path))


def iter_line_chunks(path: str, chunk_bytes: int = 1 << 21) -> Iterator[tuple[int, list[bytes] | RawRecord]]:
    """(number of the first line, whole lines totalling about `chunk_bytes`) of a line-based file, in order;
    when the rest of the file cannot be read, a last (line, RawRecord) with error "unreadable" instead."""
    first, offset, records = 1, 0, 0
    gz = local_kind(path)[1]
    with _open_bytes(path, gz) as f:
        while True:
            try:
                lines = f.readlines(chunk_bytes)
            except READ_ERRORS as e:
                # readlines() dropped the chunk's lines read before the failure: read them again one by one
                lines = _lines_before_failure(path, gz, offset)
                if lines:
                    yield first, lines
                    first += len(lines)
                    offset += sum(map(len, lines))
                    records += sum(1 for line in lines if line.strip())
                at = {"records": records, "line": first - 1, "offset": offset} if first > 1 else None
                rec = _unreadable_rest(path, gz, at, e)
                yield rec.line, rec
                return
            if not lines:
                return
            yield first, lines
            first += len(lines)
            offset += sum(map(len, lines))
            records += sum(1 for line in lines if line.strip())


def _lines_before_failure(path: str, gz: bool, offset: int) -> list[bytes]:
    """The whole lines from `offset` up to where reading fails."""
    lines = []
    with _open_bytes(path, gz) as f:
        try:
            f.seek(offset)
            for line in f:
                lines.append(line)
        except READ_ERRORS:
            pass
    return lines


def parse_json_lines(lines: Iterable[bytes], source: str, first_line: int = 1) -> Iterator[RawRecord]:
    """RawRecords of JSON-lines text; blank lines are skipped, bad lines come back with `error` set."""
    return _iter_json_lines(lines, source, first_line)


def _iter_json_lines(f: Iterable[bytes], source: str, first_line: int = 1, offset: int = 0,
                     records: int = 0) -> Iterator[RawRecord]:
    """RawRecords of JSON lines; `offset`/`records`: where `f` starts (for the positions)."""
    loads = orjson.loads
    for lineno, line in enumerate(f, first_line):
        offset += len(line)
        try:
            data, error = loads(line), None
        except orjson.JSONDecodeError as e:
            if not line.strip():
                continue  # blank lines are layout, not records
            data, error = None, parse_error(line, e)
        records += 1
        yield RawRecord(source, lineno, data, line, error, {"records": records, "offset": offset, "line": lineno})


def parse_error(text: bytes, exc: Exception) -> RecordError:
    if text.startswith(BOM):
        return RecordError("bom", "the record starts with a UTF-8 byte order mark (BOM); re-save the file as "
                                  "UTF-8 without BOM (e.g. `sed -i '1s/^\\xEF\\xBB\\xBF//' FILE`)")
    try:
        text.decode("utf-8")
    except UnicodeDecodeError as u:
        return RecordError("invalid_utf8", f"byte {u.start} is not valid UTF-8; convert the file to UTF-8 "
                                           "(e.g. `iconv -f GB18030 -t UTF-8`)")
    return RecordError("invalid_json", f"not valid JSON ({exc}); fix or remove this record")


# Outside strings: the next structural byte. Inside a string: its body up to the closing quote, a raw
# newline (never inside a valid JSON string) or the buffer's end; escapes included, never backtracking.
_STRUCTURAL = re.compile(rb'[\[\]{},"]')
_STRING_BODY = re.compile(rb'[^"\\\n]*(?:\\[^\n][^"\\\n]*)*')


class _LineCounter:
    """Line number of a buffer position; positions asked for only grow, so counting is incremental."""

    def __init__(self) -> None:
        self.pos, self.line = 0, 1

    def at(self, buf: bytes, p: int) -> int:
        self.line += buf.count(b"\n", self.pos, p)
        self.pos = p
        return self.line

    def rebase(self, buf: bytes, cut: int) -> None:
        self.at(buf, cut)
        self.pos = 0


class _Window:
    """The unread part of the file from the current element's start; grows geometrically while an element
    is incomplete, so an element of n bytes costs O(n) reads, copies and scans, not O(n^2 / chunk)."""

    def __init__(self, f: BinaryIO, buf: bytes, base: int, lines: _LineCounter) -> None:
        self.f, self.buf, self.base, self.lines = f, buf, base, lines

    def grow(self, start: int) -> tuple[bool, int]:
        """Drop what precedes `start` and read more: (got more?, how far positions moved back)."""
        more = self.f.read(max(_CHUNK, len(self.buf) - start))
        if not more:
            return False, 0
        self.lines.rebase(self.buf, start)
        self.base += start
        self.buf = self.buf[start:] + more
        return True, start


def _iter_json_array(f: BinaryIO, source: str, position: dict | None = None) -> Iterator[RawRecord]:
    """Split a top-level JSON array into elements without loading the file: track string/nesting
    state over a growing window and parse each complete element with orjson.

    A string that meets a raw newline (impossible in valid JSON: an unescaped '"' flipped the string
    state) makes its element a reject; reading resynchronises at the next line that starts an element at
    the same indentation, so one stray quote never swallows the rest of the file.
    From a `position`, `f` stands just after the ',' that ended an element (nesting depth 0 there),
    or just after the closing ']' ("closed")."""
    lines = _LineCounter()
    if position is None:
        buf = f.read(_CHUNK)
        bom = buf.startswith(BOM)
        pos = buf.index(b"[") + 1
        base, emitted, after_comma = 0, 0, False
    else:
        lines.line = position["line"]
        base, emitted = position["offset"], position["records"]
        if position.get("closed"):
            yield from _trailing_data(f, b"", 0, lines, source, emitted)
            return
        buf, pos, bom, after_comma = f.read(_CHUNK), 0, False, True
    win = _Window(f, buf, base, lines)
    start, depth, in_string = pos, 0, False
    while True:
        buf = win.buf
        if in_string:
            end = _STRING_BODY.match(buf, pos).end()
            if end < len(buf) and buf[end] == 0x22:
                pos, in_string = end + 1, False
                continue
            if end < len(buf) - 1 or (end < len(buf) and buf[end] != 0x5C):  # a raw newline: out of step
                rec, start = _resync(win, start, end, source)
                emitted += 1
                yield _positioned(rec, emitted, win, start)
                if rec.position.get("end"):
                    return
                pos, depth, in_string, after_comma = start, 0, False, True
                continue
            pos = end  # the string goes on past the window (maybe after a trailing backslash)
        else:
            m = _STRUCTURAL.search(buf, pos)
            if m is not None:
                tok, pos = buf[m.start()], m.end()
                if tok == 0x22:
                    in_string = True
                elif tok in b"[{":
                    depth += 1
                elif tok in b"]}" and depth > 0:
                    depth -= 1
                elif depth == 0 and tok in b",]":
                    elem = buf[start:m.start()]
                    if elem.strip() or tok == 0x2C or after_comma:
                        rec = _array_element(elem, buf, start, lines, source)
                        if bom and emitted == 0:
                            rec.error, rec.data = parse_error(BOM, ValueError()), None
                        emitted += 1
                        rec.position = {"records": emitted, "offset": win.base + pos, "line": lines.at(buf, pos)}
                        if tok == 0x5D:
                            rec.position["closed"] = True
                        yield rec
                    start, after_comma = pos, tok == 0x2C
                    if tok == 0x5D:  # ']': the array is closed
                        yield from _trailing_data(f, buf, pos, lines, source, emitted)
                        return
                continue
            pos = len(buf)
        grew, moved = win.grow(start) if len(buf) - start <= MAX_ELEMENT_BYTES else (False, 0)
        if not grew:
            rec = _truncated(buf, start, lines, source, emitted, after_comma, len(buf) - start > MAX_ELEMENT_BYTES)
            rec.position = {"records": emitted + 1, "end": True}
            yield rec
            return
        pos, start = pos - moved, start - moved


def _positioned(rec: RawRecord, emitted: int, win: _Window, start: int) -> RawRecord:
    if rec.position is None:
        rec.position = {"records": emitted, "offset": win.base + start, "line": win.lines.at(win.buf, start)}
    else:
        rec.position["records"] = emitted
    return rec


def _resync(win: _Window, start: int, broken: int, source: str) -> tuple[RawRecord, int]:
    """The element from `start` has a string broken at `broken` (a raw newline): reject it up to the ',' before
    the next line that opens an element at its indentation; returns (reject, index after that ',')."""
    buf = win.buf
    first = start + len(buf[start:]) - len(buf[start:].lstrip())
    bad_line = win.lines.at(buf, first) + buf.count(b"\n", first, broken)
    line_start = buf.rfind(b"\n", 0, first) + 1
    indent = buf[line_start:first]
    if line_start == 0 or indent.strip():  # the element shares its line: any indentation
        indent = rb"[ \t]*"
    else:
        indent = re.escape(indent)
    boundary = re.compile(rb",[ \t\r]*\n(?:[ \t\r]*\n)*" + indent + re.escape(buf[first:first + 1]))
    look = max(first, buf.rfind(b"\n", 0, broken) + 1)  # the broken line's own ',' may end this element
    while True:
        m = boundary.search(win.buf, look)
        if m is not None:
            break
        look = max(broken, len(win.buf) - 4096)
        grew, moved = win.grow(start)
        broken, look, start, first = broken - moved, look - moved, start - moved, first - moved
        if not grew:
            break
    buf = win.buf
    detail = (f"a string runs past the end of line {bad_line}: an unescaped '\"' inside a string (write it as \\\"); "
              "the elements after this one are read normally")
    if m is None:  # the broken element is the last one: it ends at the closing ']'
        rest = buf[first:].rstrip()
        elem = rest[:-1] if rest.endswith(b"]") else rest
        rec = RawRecord(source, win.lines.at(buf, first), None, elem.rstrip()[:1 << 20],
                        RecordError("invalid_json", detail), {"end": True})
        return rec, len(buf)
    elem = buf[first:m.start()].rstrip()
    rec = RawRecord(source, win.lines.at(buf, first), None, elem[:1 << 20], RecordError("invalid_json", detail))
    return rec, m.start() + 1


def _array_element(elem: bytes, buf: bytes, start: int, lines: _LineCounter, source: str) -> RawRecord:
    stripped = elem.lstrip()
    line = lines.at(buf, start + len(elem) - len(stripped))
    stripped = stripped.rstrip()
    if not stripped:
        return RawRecord(source, line, None, b"", RecordError(
            "invalid_json", "empty array element (a doubled or trailing comma); remove the extra comma"))
    try:
        return RawRecord(source, line, orjson.loads(stripped), stripped)
    except orjson.JSONDecodeError as e:
        return RawRecord(source, line, None, stripped, parse_error(stripped, e))


# In a reject's detail: an element ran on to the closing ']' of a complete file, taking every later element with it
# (a short read: the builder stops on it rather than report success; training counts it and goes on).
SWALLOWED_REST = "swallowed the rest of the file"


def _truncated(buf, start, lines, source, emitted, after_comma, oversized) -> RawRecord:
    elem = buf[start:]
    stripped = elem.lstrip()
    line = lines.at(buf, start + len(elem) - len(stripped))
    if oversized:
        why = f"an array element is over {MAX_ELEMENT_BYTES >> 20} MB (probably an unterminated string)"
    elif (unread := _elements_after(stripped)) is not None:
        why = (f"this element runs on to the file's closing ']': an unescaped quote or bracket in it {SWALLOWED_REST} "
               f"({unread:,} later elements unread); fix this element (or export JSON lines, where one bad line "
               "costs one record)")
        return RawRecord(source, line, None, stripped[:4096], RecordError("invalid_json", why))
    elif stripped.strip():
        why = "the file ends inside this element: the JSON array is truncated"
        if _parses(stripped):
            why = "the file ends after this element without the closing ']': the JSON array is truncated"
    else:
        why = f"the file ends before the closing ']' (after {emitted} elements): it may be truncated"
    return RawRecord(source, line, None, stripped[:4096], RecordError("invalid_json", why + "; re-export the file"))


def _elements_after(text: bytes, tries: int = 16) -> int | None:
    """How many whole elements follow a broken one that ran on to the end of the file, or None if that cannot be
    shown: the first `,` (before `{` or `[`) after which the rest parses as the tail of a JSON array. Failed tries
    stop at their first error (a few bytes: the broken element's own inner separators), so this stays cheap."""
    if not text.rstrip().endswith(b"]"):
        return None
    for match in itertools.islice(re.finditer(rb",\s*(?=[{\[])", text), tries):
        try:
            tail = orjson.loads(b"[" + text[match.end():])
        except orjson.JSONDecodeError:
            continue
        return len(tail) if isinstance(tail, list) and tail else None
    return None


def _parses(text: bytes) -> bool:
    try:
        orjson.loads(text)
        return True
    except orjson.JSONDecodeError:
        return False


def _trailing_data(f: BinaryIO, buf: bytes, pos: int, lines: _LineCounter, source: str,
                   emitted: int) -> Iterator[RawRecord]:
    rest = buf[pos:]
    while not rest.strip():
        more = f.read(_CHUNK)
        if not more:
            return
        lines.rebase(buf, len(buf))
        buf, pos, rest = more, 0, more
    lead = len(rest) - len(rest.lstrip())
    yield RawRecord(source, lines.at(buf, pos + lead), None, rest.strip()[:4096],
                    RecordError("invalid_json", "data after the closing ']' of the JSON array; remove it"),
                    {"records": emitted + 1, "end": True})


def _iter_parquet(path: str, gz: bool, position: dict | None) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    if not gz:
        yield from _parquet_rows(pq, path, path, position)
        return
    # Parquet needs random access: decompress to a temporary file (disk, not memory), once per opening.
    with tempfile.NamedTemporaryFile(suffix=".parquet") as tmp:
        with gzip.open(path, "rb") as src:
            try:
                shutil.copyfileobj(src, tmp, _CHUNK)
            except READ_ERRORS as e:  # without its end (the footer) no row of a parquet file can be found
                raise SourceError(f"{path}: the gzip data is truncated or corrupt ({e}), and a parquet file cannot "
                                  "be read without its end; re-download or re-compress it") from e
        tmp.flush()
        yield from _parquet_rows(pq, tmp.name, path, position)


def _parquet_rows(pq, real_path: str, source: str, position: dict | None) -> Iterator[RawRecord]:
    """Rows as records; `line` is the 1-based row number in the file. A row group that cannot be decoded
    (a corrupt page) is one "unreadable" record for its unread rows, and reading goes on with the next group."""
    import pyarrow as pa

    try:
        pfile = pq.ParquetFile(real_path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise SourceError(f"{source}: cannot read as parquet ({e}); check the file is complete") from e
    sizes = [pfile.metadata.row_group(g).num_rows for g in range(pfile.num_row_groups)]
    first_group, skip, records = (0, 0, 0) if position is None else \
        (position["row_group"], position["row"], position["records"])
    for group in range(first_group, pfile.num_row_groups):
        if skip >= sizes[group]:  # positioned after this group's last row
            skip = 0
            continue
        before = sum(sizes[:group])
        row = 0  # rows of this group read so far (or skipped without converting them to Python)
        try:
            for batch in pfile.iter_batches(batch_size=4096, row_groups=[group]):
                if row + batch.num_rows <= skip:
                    row += batch.num_rows
                    continue
                if row < skip:
                    batch, row = batch.slice(skip - row), skip
                for data in batch.to_pylist():
                    row += 1
                    records += 1
                    yield RawRecord(source, before + row, data, None, None,
                                    {"records": records, "row_group": group, "row": row})
        except (OSError, pa.ArrowException) as e:
            records += 1
            first_bad, last_row = before + max(row, skip) + 1, before + sizes[group]
            yield RawRecord(source, first_bad, None, b"", RecordError(
                "unreadable", f"rows {first_bad}-{last_row} (row group {group}) of {source} cannot be decoded: {e}; "
                              "they are skipped and reading goes on with the next row group. Fix: re-export the file"),
                {"records": records, "row_group": group + 1, "row": 0})
        skip = 0


def _offline_error(name: str, why: str) -> SourceError:
    return SourceError(
        f"cannot stream hub dataset '{name}': this machine is offline or cannot reach the Hugging Face Hub "
        f"({why}); download the data on a connected machine and pass the local .jsonl/.json/.parquet file instead")


def check_hub_reachable(name: str, timeout: float = 3.0) -> None:
    """Fail fast (instead of datasets' retries) when the hub endpoint cannot be reached."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return  # the user asked for the local cache: let datasets try it
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise _offline_error(name, f"{url.hostname}:{port}: {e}") from e


def _iter_hub(name: str, split: str, config: str | None, position: dict | None) -> Iterator[RawRecord]:
    check_hub_reachable(name)
    import datasets

    source = f"hub:{name}"
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except (ConnectionError, TimeoutError) as e:
        raise _offline_error(name, str(e)) from e
    except Exception as e:  # not found, gated, bad config/split: datasets' own message says which
        raise SourceError(f"cannot load hub dataset '{name}' (split {split!r}): {e}") from e
    done = 0 if position is None else position["records"]
    if done:
        ds = ds.skip(done)  # only when opened at a position (a resume): the stream keeps one open reader
    try:
        for row, data in enumerate(ds, done + 1):
            yield RawRecord(source, row, data, None, None, {"records": row})
    except (ConnectionError, TimeoutError) as e:
        raise _offline_error(name, str(e)) from e


@dataclass
class Source:
    """One input file (or hub id) with its mixing weight."""

    path: str
    weight: float | None = None
    fmt: str = "auto"


def parse_sources(specs: list[str], fmt: str = "auto") -> list[Source]:
    """`["a.jsonl", "b.jsonl:0.3"]` -> Sources. A weight is given for all files or for none."""
    sources = []
    for spec in specs:
        path, weight = split_weight(spec)
        if weight is not None and weight <= 0:
            raise ValueError(f"--data {spec}: the mixing weight must be > 0")
        if not os.path.exists(path) and not looks_like_hub_id(path):
            raise FileNotFoundError(f"--data {spec}: file {path} not found")
        sources.append(Source(path=path, weight=weight, fmt=fmt))
    weighted = [s.weight is not None for s in sources]
    if any(weighted) and not all(weighted):
        raise ValueError("--data: give a :WEIGHT for every file or for none (e.g. a.jsonl:0.8 b.jsonl:0.2)")
    return sources


def split_weight(spec: str) -> tuple[str, float | None]:
    """`"b.jsonl:0.3"` -> ("b.jsonl", 0.3); a spec without a numeric :WEIGHT -> (spec, None)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and _is_number(tail):
        return head, float(tail)
    return spec, None


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


