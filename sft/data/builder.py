"""The data build pipeline: raw files -> canonical conversations -> checked, deduplicated ShareGPT.

    read (sft.data.sources) -> normalize + validate (sft.data.formats) -> dedup (sft.data.dedup) -> [mix] -> split -> write
                                   |                               |
                            x.rejects.jsonl                 x.duplicates.jsonl

Every record read ends up in exactly one place: the output (train or validation file), the rejects file
(with source, line, reason, raw text) or the duplicates file (with the original it repeats), so
read = written + rejected + duplicates always; --mix_oversample adds `repeated` copies of mixed-in
records after deduplication (on purpose: they are the repeats it was asked for), and then
read + repeated = written + rejected + duplicates. Every file is written to a temporary name beside it and
renamed only when the whole build succeeded, all together (commit_all): an error, a full disk or Ctrl-C
leaves the previous state untouched and no temporary file behind.
"""
from __future__ import annotations

import errno
import os
import random
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import orjson

from sft.conversation import RecordError
from sft.data.dedup import ExactDeduper, NearDeduper, pack_location, unpack_location
from sft.data.formats import FORMATS, normalize_records
from sft.data.progress import BuildProgress
from sft.data.sources import SWALLOWED_REST, is_line_based, iter_raw_records, looks_like_hub_id
from sft.data.split import interleave, make_splitter, mix_targets, shuffled_raw_records
from sft.data.stats import StatsCollector
from sft.data.steps import StepConfig, parallel_outcomes, record_outcome

DEDUP_MODES = ("exact", "near", "none")
_UMASK = os.umask(0)
os.umask(_UMASK)


class BuildError(ValueError):
    """A user error (bad option, unreadable input): the message says what to change."""


class StrictError(Exception):
    """--strict: the first bad record, as `file:line: reason: detail`."""


def _help(text: str, **argparse_kwargs) -> dict:
    return {"help": text, **argparse_kwargs}


@dataclass
class BuildOptions:
    """The builder's flags (`sft_data_builder.py --help`); also its Python API."""

    output: str = field(metadata=_help("x.json writes a JSON array, x.jsonl JSON lines."))
    inputs: list[str] = field(default_factory=list, metadata=_help(
        "Input files (.jsonl/.json/.parquet, optionally .gz) or hub dataset ids."))
    format: str | None = field(default=None, metadata=_help(
        f"Force one input format: {'|'.join(FORMATS)} (default: detected per file)."))
    rejects: str | None = field(default=None, metadata=_help("Rejects file (default: <output stem>.rejects.jsonl)."))
    duplicates: str | None = field(default=None, metadata=_help(
        "Duplicates file (default: <output stem>.duplicates.jsonl)."))
    strict: bool = field(default=False, metadata=_help("Stop at the first bad record (exit 1)."))
    max_chars: int | None = field(default=100_000, metadata=_help("Reject longer records; 0: no limit."))
    dedup: str = field(default="exact", metadata=_help(f"Duplicate removal: {'|'.join(DEDUP_MODES)}."))
    near_threshold: float = field(default=0.85, metadata=_help("Jaccard threshold for --dedup near."))
    num_perm: int = field(default=128, metadata=_help("MinHash permutations for --dedup near."))
    stats: bool = field(default=False, metadata=_help("Write <stem>.stats.json/.stats.md/.stats.png."))
    # a name for sft.models.load_tokenizer on the command line; the Python API also takes a tokenizer object
    tokenizer: str | None = field(default=None, metadata=_help(
        "Tokenizer for token statistics (built-in name, folder or hub id; default: characters)."))
    max_length: int = field(default=2048, metadata=_help(
        "Report the share of records longer than this (tokens, else characters)."))
    val_ratio: float | None = field(default=None, metadata=_help(
        "Fraction of records for validation, stratified by kind."))
    val_size: int | None = field(default=None, metadata=_help(
        "Exact number of validation records, stratified by kind."))
    val_output: str | None = field(default=None, metadata=_help("Validation file (default: <output stem>.val.json[l])."))
    mix: list[str] = field(default_factory=list, metadata=_help(
        "Blend FILE in as SHARE of the final output, e.g. general.jsonl:0.2 (repeatable).",
        metavar="FILE:SHARE", action="extend"))
    mix_oversample: bool = field(default=False, metadata=_help(
        "Repeat a --mix file too small for its share until it reaches it (counted as `repeated`)."))
    limit: int | None = field(default=None, metadata=_help("Read at most this many input records."))
    seed: int = field(default=42, metadata=_help("Seed for shuffle, split and mixing."))
    shuffle: bool = field(default=False, metadata=_help("Shuffle the input (exact for plain .jsonl files)."))
    shuffle_buffer: int = field(default=10_000, metadata=_help("Buffer size when exact shuffle is impossible."))
    workers: int = field(default_factory=lambda: min(os.cpu_count() or 1, 8), metadata=_help(
        "Processes that parse/normalize JSON-lines inputs (1: all in this process; default: the cores, at most 8)."))
    hub_split: str = field(default="train", metadata=_help("Split to stream for hub dataset ids."))
    hub_config: str | None = field(default=None, metadata=_help("Config name for hub dataset ids."))
    progress_interval: float = field(default=30.0, metadata=_help(
        "Seconds between progress lines when stderr is not a terminal (a terminal gets a progress bar); "
        "0: no progress output."))

    def __post_init__(self):
        if self.max_chars == 0:  # the command line's "no limit"
            self.max_chars = None

    @property
    def mix_pairs(self) -> list[tuple[str, float]]:
        """--mix as (file, share) pairs; problems() reports a spec that is not FILE:SHARE."""
        return [pair for pair in map(_mix_pair, self.mix) if pair is not None]

    def problems(self) -> list[str]:
        out = []
        if not self.inputs:
            out.append("give at least one input file or hub dataset id")
        if output_kind(self.output) is None:
            out.append(f"--output {self.output}: must end with .json (JSON array) or .jsonl (JSON lines)")
        if self.format is not None and self.format not in FORMATS:
            out.append(f"--format {self.format}: expected one of {', '.join(FORMATS)}")
        if self.dedup not in DEDUP_MODES:
            out.append(f"--dedup {self.dedup}: expected one of {', '.join(DEDUP_MODES)}")
        if not 0 < self.near_threshold <= 1:
            out.append(f"--near_threshold {self.near_threshold}: expected a value in (0, 1]")
        if self.val_ratio is not None and self.val_size is not None:
            out.append("--val_ratio and --val_size exclude each other; pick one")
        if self.val_ratio is not None and not 0 < self.val_ratio < 1:
            out.append(f"--val_ratio {self.val_ratio}: expected a value in (0, 1)")
        if self.val_size is not None and self.val_size < 1:
            out.append(f"--val_size {self.val_size}: expected a positive count")
        if self.workers < 1:
            out.append(f"--workers {self.workers}: expected at least 1")
        if self.progress_interval < 0:
            out.append(f"--progress_interval {self.progress_interval}: expected seconds >= 0 (0: no progress output)")
        if self.limit is not None and self.limit < 1:
            out.append(f"--limit {self.limit}: expected a positive count")
        if self.max_chars is not None and self.max_chars < 1:
            out.append(f"--max_chars {self.max_chars}: expected a positive count (0 on the command line: no limit)")
        bad_mix = [spec for spec in self.mix if _mix_pair(spec) is None]
        if bad_mix:
            out.append(f"--mix {' '.join(map(str, bad_mix))}: expected FILE:SHARE, e.g. general.jsonl:0.2")
        for path in self.inputs + [m for m, _ in self.mix_pairs]:
            if not os.path.exists(path) and not looks_like_hub_id(path):
                out.append(f"{path}: no such file (and it is not a hub dataset id like 'owner/name'); check the path")
        shares = [r for _, r in self.mix_pairs]
        if shares and any(not 0 < r < 1 for r in shares) or sum(shares) >= 1:
            out.append(f"--mix shares {shares}: each must be in (0, 1) and together below 1")
        if output_kind(self.output) is not None:
            out += path_clashes(self)
        return out


def _mix_pair(spec: str | tuple[str, float]) -> tuple[str, float] | None:
    """"general.jsonl:0.2" (or a (file, share) pair from Python) -> ("general.jsonl", 0.2); None if malformed."""
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        path, share = spec
    else:
        path, sep, share = str(spec).rpartition(":")
        if not sep:
            return None
    try:
        return str(path), float(share)
    except ValueError:
        return None


@dataclass
class BuildResult:
    read: int = 0
    written: int = 0
    rejected: int = 0
    duplicates: int = 0
    val: int = 0
    mixed: int = 0
    duplicate_keys: int = 0  # records kept whose JSON repeats a key (the last value was taken): a quality flag
    repeated: int = 0
    rejected_by_reason: Counter = field(default_factory=Counter)
    duplicates_by_type: Counter = field(default_factory=Counter)
    formats: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)
    mix_report: list = field(default_factory=list)
    shuffle_mode: str | None = None
    val_kinds: Counter = field(default_factory=Counter)
    stats: StatsCollector | None = None

    def summary(self) -> str:
        line = (f"read={self.read} written={self.written} rejected={self.rejected} duplicates={self.duplicates} "
                f"train={self.written - self.val} val={self.val}")
        line += f" mixed={self.mixed}" if self.mix_report else ""
        line += f" repeated={self.repeated}" if self.repeated else ""
        return line + (f" duplicate_keys={self.duplicate_keys}" if self.duplicate_keys else "")


def output_kind(path: str) -> str | None:
    return ".jsonl" if path.endswith(".jsonl") else ".json" if path.endswith(".json") else None


def default_paths(opts: BuildOptions) -> dict[str, str]:
    kind = output_kind(opts.output) or ""
    stem = opts.output[: len(opts.output) - len(kind)]
    paths = {"output": opts.output, "rejects": opts.rejects or f"{stem}.rejects.jsonl"}
    if opts.dedup != "none":
        paths["duplicates"] = opts.duplicates or f"{stem}.duplicates.jsonl"
    if opts.val_ratio or opts.val_size:
        paths["val"] = opts.val_output or f"{stem}.val{kind}"
    if opts.stats:
        paths.update(stats_json=f"{stem}.stats.json", stats_md=f"{stem}.stats.md", stats_png=f"{stem}.stats.png")
    return paths


_OUTPUT_FLAGS = {"output": "--output", "rejects": "--rejects", "duplicates": "--duplicates", "val": "--val_output",
                 "stats_json": "--stats", "stats_md": "--stats", "stats_png": "--stats"}


def _file_identity(path: str) -> tuple:
    """What makes two spellings one file: (device, inode) when it exists (symlinks, hard links, `//x`),
    else the resolved path."""
    try:
        st = os.stat(path)
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", os.path.realpath(path))


def path_clashes(opts: BuildOptions) -> list[str]:
    """Every output (side files and their default names included) that is an input or another output.
    Outputs are replaced at the end of a build, so such a clash would overwrite an input."""
    inputs = {}
    for path in opts.inputs + [m for m, _ in opts.mix_pairs]:
        if os.path.exists(path):  # hub ids are not files
            inputs.setdefault(_file_identity(path), path)
    out, seen = [], {}
    for name, path in default_paths(opts).items():
        flag = _OUTPUT_FLAGS[name]
        given = getattr(opts, {"val": "val_output"}.get(name, name), None) if name != "output" else path
        shown = path if given else f"{path} (default name for {flag})"
        ident = _file_identity(path)
        if ident in inputs:
            out.append(f"{flag} {shown} is the same file as the input {inputs[ident]}; "
                       f"writing it would overwrite the input: give {flag} a new file")
        elif ident in seen:
            out.append(f"{flag} {shown} is the same file as {seen[ident][0]} {seen[ident][1]}; give each output its own file")
        seen.setdefault(ident, (flag, path))
    return out


def _open_for_write(fd: int) -> BinaryIO:
    """The stream of a temporary output file (tests wrap it to fill the disk at a chosen byte)."""
    return os.fdopen(fd, "wb", buffering=1 << 20)


def _write_error(path: str, err: OSError) -> BuildError:
    """A failed write as the user's problem: which file, why, and what to do."""
    folder = os.path.dirname(os.path.abspath(path))
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"the disk holding {folder} is full: free space there, or write the outputs to another disk"
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = (f"{folder} is not writable (a read-only file system or no permission): give --output (and "
               "--rejects/--duplicates/--val_output, if set) a writable folder")
    else:
        fix = "check the folder and the disk"
    return BuildError(f"cannot write {path}: {err.strerror or err}; {fix}. No output was created or changed")


class AtomicWriter:
    """Writes to a hidden temporary file beside `path`; finish() gets it onto the disk, commit_all() renames
    the finished files together, abort() deletes the temporary file. As a JSON array (`array=True`) it
    writes '[', the items separated by ',\\n', and ']' on finish. Write failures raise BuildError."""

    def __init__(self, path: str, array: bool = False):
        self.path, self.array, self.count = path, array, 0
        self.tmp, self.file = None, None
        folder = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(folder, exist_ok=True)
            fd, self.tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
            os.chmod(self.tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the final file the usual mode
            self.file = _open_for_write(fd)
            if array:
                self.file.write(b"[")
        except OSError as e:
            self.abort()
            raise _write_error(path, e) from None

    def write(self, line: bytes) -> None:
        try:
            if self.array:
                self.file.write(b"\n" if self.count == 0 else b",\n")
                self.file.write(line)
            else:
                self.file.write(line)
                self.file.write(b"\n")
        except OSError as e:
            raise _write_error(self.path, e) from None
        self.count += 1

    def finish(self) -> None:
        """Write the end and get everything onto the disk: a full disk fails here, before any rename."""
        try:
            if self.array:
                self.file.write(b"\n]\n" if self.count else b"]\n")
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        except OSError as e:
            raise _write_error(self.path, e) from None

    def abort(self) -> None:
        try:
            if self.file is not None:
                self.file.close()
        except OSError:
            pass  # on a full disk the flush of the buffered rest fails: the file goes anyway
        if self.tmp is not None and os.path.exists(self.tmp):
            os.remove(self.tmp)


def commit_all(renames: list[tuple[str, str]]) -> None:
    """Rename every (temporary, final) pair, or none: a final file that already exists is kept under a
    hidden backup name (a hard link: it never disappears) until every rename succeeded, and put back if one
    fails. Raises BuildError; the temporary files are the caller's to remove."""
    backups: dict[str, str] = {}
    done: list[str] = []
    final = None
    try:
        for tmp, final in renames:
            if os.path.lexists(final):
                backups[final] = f"{tmp}.old"
                try:
                    os.link(final, backups[final], follow_symlinks=False)
                except OSError:  # no hard links here (some network/FUSE file systems): move it aside
                    os.replace(final, backups[final])
        for tmp, final in renames:
            os.replace(tmp, final)
            done.append(final)
    except BaseException as e:  # a failed rename, or Ctrl-C between two renames
        for path in reversed(done):
            if path in backups:
                os.replace(backups.pop(path), path)
            else:
                os.remove(path)
        for path, backup in list(backups.items()):
            if not os.path.lexists(path):  # moved aside, not yet replaced
                os.replace(backups.pop(path), path)
        if isinstance(e, OSError):
            raise _write_error(final, e) from None
        raise
    finally:
        for backup in backups.values():
            if os.path.lexists(backup):
                os.remove(backup)


def build(opts: BuildOptions, log: Callable[[str], None] = lambda msg: None,
          progress: BuildProgress | None = None) -> BuildResult:
    """Run the whole build; raises BuildError (user error, unwritable or full disk), StrictError (--strict),
    KeyboardInterrupt. On any exception no output file is created or changed and no temporary file stays.
    `progress` is told the counts as records are read."""
    problems = opts.problems()
    if problems:
        raise BuildError("; ".join(problems))
    paths = default_paths(opts)
    writers: dict[str, AtomicWriter] = {}
    scratch: list[str] = []
    stats_names = [name for name in ("stats_json", "stats_md", "stats_png") if name in paths]
    try:
        for name in ("output", "val", "rejects", "duplicates"):
            if name in paths:
                writers[name] = AtomicWriter(paths[name], array=name in ("output", "val")
                                             and output_kind(paths[name]) == ".json")
        result = _Pipeline(opts, writers, scratch, log, progress).run()
        if opts.stats:
            try:
                _write_stats(result, paths)
            except OSError as e:
                raise _write_error(paths["stats_json"], e) from None
        for w in writers.values():
            w.finish()
        commit_all([(w.tmp, w.path) for w in writers.values()]
                   + [(_stats_tmp(paths[name]), paths[name]) for name in stats_names])
        result.paths = paths
        return result
    finally:
        if progress is not None:
            progress.close()
        for w in writers.values():
            w.abort()  # after a commit there is nothing left to remove
        for path in scratch + [_stats_tmp(paths[name]) for name in stats_names]:
            if os.path.exists(path):
                os.remove(path)


def _stats_tmp(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{os.getpid()}.tmp")


def _write_stats(result: BuildResult, paths: dict) -> None:
    stats = result.stats
    counts = {"read": result.read, "written": result.written, "rejected": result.rejected,
              "duplicates": result.duplicates, "train": result.written - result.val, "val": result.val}
    extra = {"rejected_by_reason": dict(result.rejected_by_reason.most_common()),
             "duplicates_by_type": dict(result.duplicates_by_type), "formats": result.formats,
             "val_kinds": dict(result.val_kinds), "mix": result.mix_report or None, "shuffle": result.shuffle_mode,
             "duplicate_keys": result.duplicate_keys}
    report = stats.report(counts, extra)
    tmp = {k: _stats_tmp(paths[k]) for k in ("stats_json", "stats_md", "stats_png")}
    stats.write(report, tmp["stats_json"], tmp["stats_md"], tmp["stats_png"])
    # the markdown links the final PNG name, not the temporary one
    with open(tmp["stats_md"], "r+", encoding="utf-8") as f:
        text = f.read().replace(os.path.basename(tmp["stats_png"]), os.path.basename(paths["stats_png"]))
        f.seek(0), f.truncate(), f.write(text)


class _Pipeline:
    def __init__(self, opts: BuildOptions, writers: dict, scratch: list, log: Callable[[str], None],
                 progress: BuildProgress | None = None):
        self.opts, self.writers, self.scratch, self.log, self.progress = opts, writers, scratch, log, progress
        self.result = BuildResult()
        self.result.stats = StatsCollector(_load_tokenizer(opts.tokenizer), opts.max_length) if opts.stats else None
        self.exact = ExactDeduper() if opts.dedup != "none" else None
        self.near = NearDeduper(opts.near_threshold, opts.num_perm) if opts.dedup == "near" else None
        self.source_ids: dict[str, int] = {}
        self.source_names: list[str] = []
        self.output_is_text: bool | None = None

    def run(self) -> BuildResult:
        main = self._good_records(self.opts.inputs, read_limit=self.opts.limit)
        if self.opts.mix:
            main = self._mixed(main)
        self._sink(main)
        if self.progress is not None:
            self.progress.update(self.result.read, self.result.rejected, self.result.duplicates)
        return self.result

    # -- reading
    def _outcomes(self, paths: list[str], read_limit: int | None) -> Iterator[tuple[tuple, str, Any, Any]]:
        """(outcome, source, raw record or raw line bytes, conversation if kept in-process)."""
        opts = self.opts
        key = "none" if opts.dedup == "none" else "text" if opts.dedup == "near" else "hash"
        cfg = StepConfig(opts.format, opts.max_chars, key, opts.stats)
        tokens = self.result.stats is not None and self.result.stats.tokenizer is not None
        if opts.workers > 1 and not opts.shuffle and not tokens and all(is_line_based(p) for p in paths):
            for outcome, source, line in parallel_outcomes(paths, cfg, opts.workers, read_limit, self.result.formats):
                yield outcome, source, line, None
            return
        raws = self._raw(paths)
        if read_limit is not None:
            raws = _take(raws, read_limit)
        for item in normalize_records(raws, opts.format, opts.max_chars, self.result.formats):
            yield record_outcome(item, cfg), item.raw.source, item.raw, item.conversation

    def _raw(self, paths: list[str]) -> Iterator:
        kw = {"hub_split": self.opts.hub_split, "hub_config": self.opts.hub_config}
        if self.opts.shuffle:
            records, mode = shuffled_raw_records(paths, self.opts.seed, self.opts.shuffle_buffer, **kw)
            self.result.shuffle_mode = mode
            if mode == "buffer":
                self.log(f"shuffle: approximate, with a buffer of {self.opts.shuffle_buffer} records "
                         "(exact shuffling needs plain .jsonl inputs)")
            return records
        return (rec for p in paths for rec in iter_raw_records(p, **kw))

    def _good_records(self, paths: list[str], read_limit: int | None = None,
                      take: int | None = None) -> Iterator[tuple[str, bytes]]:
        """(kind, ShareGPT JSON line) for every record that passes; bad ones and duplicates are routed."""
        res, stats = self.result, self.result.stats
        kept = 0
        for outcome, source, raw, conv in self._outcomes(paths, read_limit):
            if self.progress is not None:  # the totals before this record: one call per record, throttled inside
                self.progress.update(res.read, res.rejected, res.duplicates)
            res.read += 1
            if not outcome[0]:
                self._reject(source, outcome[1], outcome[2], outcome[3], raw)
                continue
            _, line, kind, is_text, key, out, features, dup_keys = outcome
            res.duplicate_keys += dup_keys
            if self.output_is_text is None:
                self.output_is_text = is_text
            elif self.output_is_text != is_text:
                err = _mixed_error(self.output_is_text)
                self._reject(source, line, err.reason, err.detail, raw)
                continue
            if key is not None and self._is_duplicate(source, line, key, raw):
                continue
            if stats is not None:
                stats.add(kind, f"{source}:{line}", features, conv)
            yield kind, out
            kept += 1
            if take is not None and kept >= take:
                return

    def _reject(self, source: str, line: int, reason: str, detail: str, raw: Any) -> None:
        if SWALLOWED_REST in detail:  # the records after it were never read: a short read is not a success
            raise BuildError(f"{source}:{line}: {detail}")
        if self.opts.strict:
            raise StrictError(f"{source}:{line}: {reason}: {detail}")
        self.result.rejected += 1
        self.result.rejected_by_reason[reason] += 1
        self.writers["rejects"].write(orjson.dumps(
            {"source": source, "line": line, "reason": reason, "error": detail, "raw": _raw_text(raw)}))

    def _is_duplicate(self, source: str, line: int, key: Any, raw: Any) -> bool:
        sid = self.source_ids.get(source)
        if sid is None:
            sid = self.source_ids[source] = len(self.source_names)
            self.source_names.append(source)
        loc = pack_location(sid, line)
        if isinstance(key, str):  # near mode: the normalized text
            kind, original = "exact", self.exact.check(key, loc)
            if original is None:
                kind, original = "near", self.near.check(key, loc)
        else:
            kind, original = "exact", self.exact.check_hash(key, loc)
        if original is None:
            return False
        osid, oline = unpack_location(original)
        self.result.duplicates += 1
        self.result.duplicates_by_type[kind] += 1
        head = orjson.dumps({"source": source, "line": line, "type": kind,
                             "original_source": self.source_names[osid], "original_line": oline})
        self.writers["duplicates"].write(head[:-1] + b',"record":' + _raw_json(raw) + b"}")
        return True

    # -- mixing
    def _mixed(self, main: Iterator[tuple[str, bytes]]) -> Iterator[tuple[str, bytes]]:
        """Scenario records first (to count them), then exactly enough of each mix set; spooled to
        scratch files and interleaved at random. A set too small for its share is repeated up to it with
        --mix_oversample (the repeats are a stream of their own, so they spread over the whole output)."""
        spools, counts = [], []
        spool, n = self._spool(main)
        spools.append(spool), counts.append(n)
        targets = mix_targets(n, [r for _, r in self.opts.mix_pairs])
        for (path, share), target in zip(self.opts.mix_pairs, targets):
            before = self.result.read
            spool, got = self._spool(self._good_records([path], take=target) if target else iter(()))
            spools.append(spool), counts.append(got)
            repeated = 0
            if self.opts.mix_oversample and 0 < got < target:
                repeat_spool, repeated = self._spool(self._repeats(spool, got, target - got))
                spools.append(repeat_spool), counts.append(repeated)
            self.result.mixed += got + repeated
            self.result.repeated += repeated
            self.result.mix_report.append({"file": path, "requested_share": share, "target": target, "written": got,
                                           "read": self.result.read - before, "repeated": repeated})
        total = sum(counts)
        for entry in self.result.mix_report:
            entry["achieved_share"] = round((entry["written"] + entry["repeated"]) / total, 6) if total else 0.0
            self.log(mix_line(entry, self.opts.mix_oversample))
        streams = [self._unspool(p) for p in spools]
        return interleave(streams, counts, self.opts.seed)

    def _repeats(self, spool: str, have: int, extra: int) -> Iterator[tuple[str, bytes]]:
        """`extra` more records from a mix set of `have`: whole passes over it, then a seeded random subset
        (so no record is repeated twice more than another)."""
        passes, rest = divmod(extra, have)
        for _ in range(passes):
            yield from self._unspool(spool)
        chosen = set(random.Random(self.opts.seed).sample(range(have), rest))
        for i, item in enumerate(self._unspool(spool)):
            if i in chosen:
                yield item

    def _spool(self, records: Iterable[tuple[str, bytes]]) -> tuple[str, int]:
        folder = os.path.dirname(os.path.abspath(self.opts.output))
        path = os.path.join(folder, ".mix.tmp")
        try:
            fd, path = tempfile.mkstemp(prefix=".mix.", suffix=".tmp", dir=folder)
            self.scratch.append(path)
            n = 0
            with _open_for_write(fd) as f:
                for kind, line in records:
                    f.write(orjson.dumps(kind) + b"\t" + line + b"\n")
                    n += 1
        except OSError as e:
            raise _write_error(path, e) from None
        return path, n

    @staticmethod
    def _unspool(path: str) -> Iterator[tuple[str, bytes]]:
        with open(path, "rb") as f:
            for row in f:
                kind, line = row.rstrip(b"\n").split(b"\t", 1)
                yield orjson.loads(kind), line

    # -- writing
    def _sink(self, records: Iterable[tuple[str, bytes]]) -> None:
        splitter = make_splitter(self.opts.val_ratio, self.opts.val_size, self.opts.seed)
        out = self.writers["output"]
        if splitter is None:
            for _, line in records:
                out.write(line)
                self.result.written += 1
            return
        for kind, line in records:
            self._route(splitter.add(kind, (kind, line)))
        try:
            self._route(splitter.finish())
        except ValueError as e:
            raise BuildError(str(e)) from None

    def _route(self, routed: Iterable[tuple[bool, tuple[str, bytes]]]) -> None:
        for to_val, (kind, line) in routed:
            self.result.written += 1
            if to_val:
                self.writers["val"].write(line)
                self.result.val += 1
                self.result.val_kinds[kind] += 1
            else:
                self.writers["output"].write(line)


def mix_line(entry: dict, oversample: bool) -> str:
    """One console line per mixed-in file: requested against achieved share, a warning when short."""
    file, got, repeated = entry["file"], entry["written"], entry["repeated"]
    achieved, requested = entry["achieved_share"], entry["requested_share"]
    shares = f"{achieved:.2%} of the output (requested {requested:.2%})"
    if repeated:
        return (f"mix: {file}: {got} records + {repeated} repeats = {shares}; --mix_oversample repeated the "
                f"{got} usable records to reach the share")
    if got < entry["target"]:
        fix = ("it has no usable record to repeat; check the file" if oversample and got == 0 else
               "add records, lower the share, or pass --mix_oversample to repeat them up to it")
        return (f"warning: --mix {file}: only {got} usable records for the {entry['target']} needed: "
                f"{shares}; {fix}")
    return f"mix: {file}: {got} records = {shares}"


def _take(iterable: Iterable, n: int) -> Iterator:
    for i, x in enumerate(iterable):
        if i >= n:
            return
        yield x


def _raw_text(raw: Any) -> str:
    if isinstance(raw, bytes):
        return raw.rstrip(b"\r\n").decode("utf-8", "backslashreplace")
    return raw.raw


def _raw_json(raw: Any) -> bytes:
    """The record as one line of JSON, as read when possible (it parsed, so the bytes are valid JSON)."""
    if isinstance(raw, bytes):
        return raw.strip()
    if raw.raw_bytes is not None and b"\n" not in raw.raw_bytes.strip():
        return raw.raw_bytes.strip()
    return orjson.dumps(raw.data, default=str)  # parquet rows; elements of an indented JSON array span lines


def _mixed_error(output_is_text: bool) -> RecordError:
    first, this = ("plain-text", "conversation") if output_is_text else ("conversation", "plain-text")
    return RecordError("mixed_text_and_chat", f"this {this} record cannot go into an output whose first record was "
                                              f"{first}; build text and chat data into separate files")


def _load_tokenizer(spec: Any) -> Any:
    if spec is None or not isinstance(spec, str):
        return spec
    try:
        from sft.models import load_tokenizer
    except ImportError as e:
        raise BuildError(f"--tokenizer {spec}: sft.models.load_tokenizer is not available ({e})") from None
    try:
        return load_tokenizer(spec)
    except Exception as e:  # any loading failure is a user-facing error here
        raise BuildError(f"--tokenizer {spec}: cannot load it ({e})") from None
