"""Faults of issue 16 on the data side (items 8, 9, 10, duplicate keys; issue 17's one-object .json): the
shared reader, the builder and the training stream. Each test is named after the item it reproduces."""
import errno
import gzip
import io
import json
import os
from itertools import islice

import pytest
from hostile_data import corrupt_parquet, firefly, readable_gzip_lines

import sft.data.builder as builder
import sft_data_builder
from sft.data.builder import BuildError, BuildOptions, build
from sft.data.json_checks import has_duplicate_keys
from sft.data.sources import count_records, iter_raw_records, parse_sources
from sft.tokens.collate import StreamOptions
from sft.tokens.encoding import EncodeOptions
from sft.tokens.stream import TrainStream

OPTIONS = StreamOptions(batch_size=2, shuffle_buffer=16, max_length=64, seed=1)
ENCODE = EncodeOptions(max_length=64)


def _jsonl(path, lines):
    path.write_bytes(("\n".join(lines) + "\n").encode())
    return str(path)


def _good_lines(start, n):
    return [json.dumps(firefly(i)) for i in range(start, start + n)]


def _truncated_gz(path, start, n):
    packed = gzip.compress(("\n".join(_good_lines(start, n)) + "\n").encode())
    path.write_bytes(packed[: len(packed) // 2])
    return str(path), readable_gzip_lines(path)


def _hostile_sources(tmp_path):
    """Four bad inputs of item 8 and a good one: (paths, {path: (line, reason)} of the one reject each)."""
    surrogate = _jsonl(tmp_path / "surrogate.jsonl", _good_lines(0, 2) + ['{"input": "q\\ud800", "target": "a"}']
                       + _good_lines(2, 2))
    deep = _jsonl(tmp_path / "deep.jsonl", _good_lines(10, 2) + ['{"input": "q", "target": "a", "x": '
                                                                 + "[" * 5000 + "]" * 5000 + "}"] + _good_lines(12, 2))
    truncated, readable = _truncated_gz(tmp_path / "cut.jsonl.gz", 100, 400)
    parquet, first_bad_row = corrupt_parquet(tmp_path / "pages.parquet", 300, 100, 1)
    good = _jsonl(tmp_path / "good.jsonl", _good_lines(1000, 6))
    expected = {surrogate: (3, "invalid_json"), deep: (3, "invalid_json"), truncated: (readable + 1, "unreadable"),
                parquet: (first_bad_row, "unreadable")}
    return [surrogate, deep, truncated, parquet, good], expected


def _rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_item8_training_rejects_unreadable_files_and_hostile_records_and_goes_on(tmp_path, qwen_tokenizer):
    paths, expected = _hostile_sources(tmp_path)
    rejects = tmp_path / "train_rejects-rank0.jsonl"
    stream = TrainStream(parse_sources(paths), qwen_tokenizer, ENCODE, OPTIONS, rejects_path=str(rejects))
    batches, states = [], {}
    total = sum(count_records(p) for p in paths)  # what training counts at start-up: must not raise either
    it = iter(stream)
    while stream.counters["records"] < total:
        batches.append(next(it))
        states[len(batches)] = json.loads(json.dumps(stream.state_at(len(batches))))
    seen = [sid for b in batches for sid in b["sample_ids"]]
    # reading went on after each bad part: the parquet rows after the corrupt group, the next file
    assert "pages.parquet:201" in seen and "good.jsonl:6" in seen and "deep.jsonl:4" in seen
    assert not any(s.startswith("pages.parquet:") and 101 <= int(s.split(":")[1]) <= 200 for s in seen)
    rows = _rows(rejects)
    assert {r["source"]: (r["line"], r["reason"]) for r in rows} == expected
    by_source = {r["source"]: r for r in rows}
    assert "low surrogate" in by_source[paths[0]]["error"] and "depth limit" in by_source[paths[1]]["error"]
    cut = by_source[paths[2]]["error"]
    assert paths[2] in cut and f"after line {expected[paths[2]][0] - 1}" in cut and "gzip -t" in cut
    assert "rows 101-200 (row group 1)" in by_source[paths[3]]["error"]
    assert stream.counters["rejected"] == 4 and stream.reject_reasons == {"invalid_json": 2, "unreadable": 2}
    # a resume anywhere (before, inside and after the bad parts) reads on without a crash, batch for batch
    for done in (3, len(batches) // 2, len(batches) - 2):
        resumed = TrainStream(parse_sources(paths), qwen_tokenizer, ENCODE, OPTIONS)
        resumed.load_state(states[done])
        again = list(islice(iter(resumed), len(batches) - done))
        assert [b["sample_ids"] for b in again] == [b["sample_ids"] for b in batches[done:]]


def test_item8_count_records_of_a_truncated_gz_counts_its_reject(tmp_path):
    path, readable = _truncated_gz(tmp_path / "cut.jsonl.gz", 0, 400)
    records = list(iter_raw_records(path))
    assert count_records(path) == len(records) == readable + 1
    assert records[-1].error.reason == "unreadable" and records[-1].position["end"]


def test_item8_a_bad_crc_gz_is_read_then_rejected_once(tmp_path):
    packed = bytearray(gzip.compress(("\n".join(_good_lines(0, 50)) + "\n").encode()))
    packed[-6] ^= 0xFF  # the CRC32 of the trailer
    path = tmp_path / "crc.jsonl.gz"
    path.write_bytes(bytes(packed))
    records = list(iter_raw_records(str(path)))
    assert [r.error is None for r in records] == [True] * 50 + [False]
    assert records[-1].line == 51 and "CRC check failed" in records[-1].error.detail


@pytest.mark.parametrize("with_parquet", [True, False])  # without it: the worker processes' path
def test_item9_builder_rejects_deep_records_and_unreadable_files(tmp_path, with_parquet):
    deep = _jsonl(tmp_path / "deep.jsonl", _good_lines(0, 2) + [
        '{"input": "q", "target": "a", "tree": ' + "[" * levels + "]" * levels + "}" for levels in (256, 700, 1023)])
    truncated, readable = _truncated_gz(tmp_path / "cut.jsonl.gz", 100, 400)
    parquet, first_bad_row = corrupt_parquet(tmp_path / "pages.parquet", 300, 100, 1)
    crc = bytearray(gzip.compress(("\n".join(_good_lines(500, 20)) + "\n").encode()))
    crc[-6] ^= 0xFF
    (tmp_path / "crc.jsonl.gz").write_bytes(bytes(crc))
    inputs = [deep, truncated] + [parquet] * with_parquet + [str(tmp_path / "crc.jsonl.gz")]
    result = build(BuildOptions(output=str(tmp_path / "out" / "x.jsonl"), inputs=inputs, workers=2))
    assert result.read == 5 + readable + 1 + 201 * with_parquet + 21
    assert result.read == result.written + result.rejected + result.duplicates
    assert result.rejected_by_reason == {"too_deep": 3, "unreadable": 2 + with_parquet}
    rows = _rows(tmp_path / "out" / "x.rejects.jsonl")
    assert [(r["source"], r["line"], r["reason"]) for r in rows] == [
        (deep, 3, "too_deep"), (deep, 4, "too_deep"), (deep, 5, "too_deep"), (truncated, readable + 1, "unreadable")
    ] + [(parquet, first_bad_row, "unreadable")] * with_parquet + [(inputs[-1], 21, "unreadable")]
    assert "field 'tree' nests 1023 levels" in rows[2]["error"] and "255" in rows[2]["error"]


def test_item9_read_only_output_folder_is_a_clear_error(tmp_path, monkeypatch, capsys):
    src = _jsonl(tmp_path / "in.jsonl", _good_lines(0, 5))
    out = tmp_path / "ro" / "x.jsonl"

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(builder.tempfile, "mkstemp", read_only)
    assert sft_data_builder.main([src, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"cannot write {out}: Read-only file system" in err and "give --output" in err and "writable folder" in err
    assert not out.exists()


class _FullDisk(io.RawIOBase):
    """A file on a disk with `free[0]` bytes left (shared by all files): ENOSPC past that byte."""

    def __init__(self, fd, free):
        self.fd, self.free = fd, free

    def writable(self):
        return True

    def write(self, data):
        n = min(len(data), self.free[0])
        if n == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        os.write(self.fd, bytes(data[:n]))
        self.free[0] -= n
        return n

    def fileno(self):
        return self.fd

    def close(self):
        if not self.closed:
            os.close(self.fd)
        super().close()


def _build_full_disk_case(tmp_path, fmt, val):
    src = _jsonl(tmp_path / "in.jsonl", _good_lines(0, 150) + ["{bad"] * 20 + _good_lines(0, 30))
    out = tmp_path / "out" / f"x{fmt}"
    opts = dict(output=str(out), inputs=[src], workers=1, stats=True, val_ratio=0.1 if val else None)
    return opts, out.parent


@pytest.mark.parametrize("fmt,val", [(".jsonl", False), (".json", True)])
def test_item10_full_disk_leaves_old_outputs_and_no_temp_file(tmp_path, monkeypatch, fmt, val):
    opts, folder = _build_full_disk_case(tmp_path, fmt, val)
    build(BuildOptions(**opts))  # a first build: the outputs a failed second build must leave alone
    before = {p: open(folder / p, "rb").read() for p in os.listdir(folder)}
    total = sum(len(v) for k, v in before.items() if ".stats." not in k)
    opts["inputs"] = opts["inputs"] * 2  # the second build writes more than the first
    for free in (0, 1, 5000, total - 100, total + 5000):
        space = [free]
        monkeypatch.setattr(builder, "_open_for_write", lambda fd: io.BufferedWriter(_FullDisk(fd, space), 4096))
        with pytest.raises(BuildError, match=r"cannot write .*No space left on device; the disk holding .* is full"):
            build(BuildOptions(**opts))
        assert sorted(os.listdir(folder)) == sorted(before), free  # no hidden temporary file
        assert {p: open(folder / p, "rb").read() for p in before} == before, free


def test_item10_a_failed_rename_puts_back_every_output_already_replaced(tmp_path, monkeypatch):
    opts, folder = _build_full_disk_case(tmp_path, ".jsonl", True)
    build(BuildOptions(**opts))
    before = {p: open(folder / p, "rb").read() for p in os.listdir(folder)}
    opts["inputs"] = opts["inputs"] * 2
    real_replace, calls = os.replace, []

    def third_rename_fails(src, dst):
        calls.append(dst)
        if len(calls) == 3 and str(src).endswith(".tmp"):
            raise OSError(errno.EIO, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(builder.os, "replace", third_rename_fails)
    with pytest.raises(BuildError, match=r"Input/output error.*No output was created or changed"):
        build(BuildOptions(**opts))
    assert len(calls) > 3  # two outputs were replaced, then put back
    assert sorted(os.listdir(folder)) == sorted(before)
    assert {p: open(folder / p, "rb").read() for p in before} == before
    monkeypatch.setattr(builder.os, "replace", real_replace)
    assert build(BuildOptions(**opts)).read == 400  # and a build that works replaces them all


def test_item10_interrupt_removes_every_temporary_file(tmp_path, monkeypatch):
    opts, folder = _build_full_disk_case(tmp_path, ".json", True)
    opts["mix"] = [_jsonl(tmp_path / "mix.jsonl", _good_lines(900, 50)) + ":0.2"]
    real = builder.AtomicWriter.finish

    def interrupted(self):
        real(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(builder.AtomicWriter, "finish", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(BuildOptions(**opts))
    assert os.listdir(folder) == []  # outputs, side files, stats and the mixing spools: all gone


def test_duplicate_keys_are_counted_as_a_quality_flag(tmp_path):
    lines = ['{"input": "q1", "target": "a1", "input": "q1 again"}',          # top level
             '{"input": "q2", "target": "say \\"hi\\"", "kind": "x"}',         # escaped quotes: no duplicate
             '{"input": "q3", "target": "a3", "meta": {"k": 1, "k": 2}}',     # nested object
             '{"input": "q4", "target": "a4", "\\u0069nput": "q4b"}',         # the same key spelled with an escape
             '{"input": "q5", "target": "a5 \\u0022", "kind": "y"}',          # \u0022 quote: checked, none
             '{"input": "q7", "target": "at 12:00: \\"noon\\""}',               # colons in text: the quote check
             json.dumps(firefly(6))]
    src = _jsonl(tmp_path / "in.jsonl", lines)
    flags = []
    for rec in iter_raw_records(src):
        flags.append(has_duplicate_keys(rec))
    assert flags == [True, False, True, True, False, False, False]
    result = build(BuildOptions(output=str(tmp_path / "x.jsonl"), inputs=[src], workers=2, stats=True))
    assert result.duplicate_keys == 3 and result.written == 7  # a flag, never a reject
    assert result.summary().endswith("duplicate_keys=3")
    report = json.loads((tmp_path / "x.stats.json").read_text())
    assert report["duplicate_keys"] == 3
    assert report["noisy_answers"]["duplicate_keys"] == {"count": 3, "examples": [f"{src}:1", f"{src}:3", f"{src}:4"]}
    assert "| duplicate_keys | 3 |" in (tmp_path / "x.stats.md").read_text()


@pytest.mark.parametrize("name", ["conversation.json", "conversation.json.gz"])
def test_issue17_a_pretty_printed_json_object_is_one_record(tmp_path, qwen_tokenizer, name):
    record = {"conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4"}],
              "system": "Be brief."}
    text = ("\n" + json.dumps(record, indent=2) + "\n").encode()
    path = tmp_path / name
    path.write_bytes(gzip.compress(text) if name.endswith(".gz") else text)
    records = list(iter_raw_records(str(path)))
    assert [(r.line, r.data, r.error) for r in records] == [(2, record, None)]
    assert count_records(str(path)) == 1
    result = build(BuildOptions(output=str(tmp_path / "x.jsonl"), inputs=[str(path)], workers=2))
    assert (result.read, result.written, result.rejected) == (1, 1, 0)
    assert json.loads((tmp_path / "x.jsonl").read_text()) == record
    stream = TrainStream(parse_sources([str(path)]), qwen_tokenizer, ENCODE, OPTIONS)
    assert next(iter(stream))["sample_ids"] == [f"{name}:2"]


def test_issue17_a_broken_pretty_printed_object_is_read_as_lines_and_rejected(tmp_path):
    path = tmp_path / "conversation.json"
    path.write_text('{\n  "conversations": [\n    {"from": "human", "value": "q"}\n', encoding="utf-8")
    records = list(iter_raw_records(str(path)))
    assert [(r.line, r.error and r.error.reason) for r in records] == [(1, "invalid_json"), (2, "invalid_json"), (3, None)]
