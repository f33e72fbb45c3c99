"""sft.data.sources: streaming readers, line numbers, error records, hub handling (all offline)."""
import gzip
import json
import os
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import sft.data.sources as sources
from sft.data.sources import SourceError, iter_raw_records

DATA = os.path.join(os.path.dirname(__file__), "fixtures")


def summary(path, **kw):
    return [(r.line, r.data, r.error.reason if r.error else None) for r in iter_raw_records(str(path), **kw)]


def test_jsonl_lines_blank_lines_and_errors(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"a": 1}\n\n  \n{"b": 2}\r\n{bad\n[1]\n')
    assert summary(p) == [(1, {"a": 1}, None), (4, {"b": 2}, None), (5, None, "invalid_json"), (6, [1], None)]
    assert [r.raw for r in iter_raw_records(str(p))][2] == "{bad"


@pytest.mark.parametrize("chunk", [3, 16, 1 << 20])
def test_json_array_elements_and_start_lines(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(sources, "_CHUNK", chunk)  # element and string boundaries across reads
    p = tmp_path / "a.json"
    p.write_text('[\n  {"q": "含 ] 和 } 的 \\"字符串\\"", "n": [1, {"x": "]"}]},\n\n  {\n    "q": "多行"\n  },\n'
                 '  {"q": "\\\\"}\n]\n', encoding="utf-8")
    assert summary(p) == [(2, {"q": '含 ] 和 } 的 "字符串"', "n": [1, {"x": "]"}]}, None),
                          (4, {"q": "多行"}, None), (7, {"q": "\\"}, None)]


def test_json_one_object_per_line(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('{"a": 1}\n{"a": 2}\n', encoding="utf-8")
    assert summary(p) == [(1, {"a": 1}, None), (2, {"a": 2}, None)]


def test_json_array_damage(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('[{"a": 1},, {"a": 2},\n {"a": 3} x]\n', encoding="utf-8")
    assert summary(p) == [(1, {"a": 1}, None), (1, None, "invalid_json"), (1, {"a": 2}, None), (2, None, "invalid_json")]
    p.write_text('[{"a": 1}]\ntrailing', encoding="utf-8")
    assert summary(p) == [(1, {"a": 1}, None), (2, None, "invalid_json")]
    p.write_text("[]", encoding="utf-8")
    assert summary(p) == []


def test_truncated_array_fixture():
    got = list(iter_raw_records(os.path.join(DATA, "truncated.json")))
    assert [(r.line, r.error.reason if r.error else None) for r in got] == [(2, None), (3, None), (5, "invalid_json")]
    assert "truncated" in got[-1].error.detail and got[-1].raw.startswith('{"kind": "OpenQA", "input": "第三"')


def test_bom_and_invalid_utf8_fixtures():
    assert [(line, reason) for line, _, reason in summary(os.path.join(DATA, "bom.jsonl"))] == [(1, "bom"), (2, None)]
    got = list(iter_raw_records(os.path.join(DATA, "gbk.jsonl")))
    assert [(r.line, r.error.reason if r.error else None) for r in got] == [(1, None), (2, "invalid_utf8")]
    assert "iconv" in got[1].error.detail and "\\x" in got[1].raw  # raw kept, undecodable bytes escaped


def test_bom_before_json_array(tmp_path):
    p = tmp_path / "a.json"
    p.write_bytes(b'\xef\xbb\xbf[{"a": 1}, {"a": 2}]')
    assert summary(p) == [(1, None, "bom"), (1, {"a": 2}, None)]


def test_gzip_of_jsonl_and_json_array(tmp_path):
    a = tmp_path / "a.jsonl.gz"
    a.write_bytes(gzip.compress(b'{"a": 1}\n{"a": 2}\n'))
    b = tmp_path / "b.json.gz"
    b.write_bytes(gzip.compress(b'[\n{"a": 1},\n{"a": 2}\n]'))
    assert summary(a) == [(1, {"a": 1}, None), (2, {"a": 2}, None)]
    assert summary(b) == [(2, {"a": 1}, None), (3, {"a": 2}, None)]


def test_parquet_and_gzipped_parquet(tmp_path):
    table = pa.table({"instruction": ["a", "b"], "output": ["x", "y"]})
    p = tmp_path / "a.parquet"
    pq.write_table(table, p)
    g = tmp_path / "a.parquet.gz"
    g.write_bytes(gzip.compress(p.read_bytes()))
    expected = [(1, {"instruction": "a", "output": "x"}, None), (2, {"instruction": "b", "output": "y"}, None)]
    assert summary(p) == expected and summary(g) == expected
    assert json.loads(next(iter_raw_records(str(p))).raw) == {"instruction": "a", "output": "x"}


def test_big_json_array_is_streamed(tmp_path):
    p = tmp_path / "big.json"
    with open(p, "w", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(json.dumps({"input": "问" * 1400, "target": str(i)}) for i in range(2500)) + "\n]")
    size = os.path.getsize(p)
    tracemalloc.start()
    n = sum(1 for _ in iter_raw_records(str(p)))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 2500
    assert size > 20e6 and peak < 8e6  # a few 1 MB chunks, not the file


def test_missing_file_unsupported_type_and_directory(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        list(iter_raw_records(str(tmp_path / "nope.jsonl")))
    (tmp_path / "a.csv").write_text("a,b\n")
    with pytest.raises(SourceError, match="unsupported file type"):
        list(iter_raw_records(str(tmp_path / "a.csv")))
    with pytest.raises(SourceError, match="is a directory"):
        list(iter_raw_records(str(tmp_path)))


def test_hub_id_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def no_network(*a, **k):
        raise OSError("Name or service not known")

    monkeypatch.setattr(sources.socket, "create_connection", no_network)
    with pytest.raises(SourceError) as e:
        list(iter_raw_records("YeungNLP/firefly-train-1.1M"))
    msg = str(e.value)
    assert "YeungNLP/firefly-train-1.1M" in msg and "offline" in msg and "local" in msg


def test_hub_connection_error_inside_datasets_is_translated(monkeypatch):
    import datasets

    monkeypatch.setattr(sources, "check_hub_reachable", lambda name: None)

    def refuse(*a, **k):
        raise ConnectionError("Couldn't reach 'owner/name' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    with pytest.raises(SourceError, match="cannot stream hub dataset 'owner/name'.*offline"):
        list(iter_raw_records("owner/name"))


def test_hub_rows_are_streamed_with_row_numbers(monkeypatch):
    import datasets

    calls = {}

    def fake_load(name, config, split, streaming):
        calls.update(name=name, split=split, streaming=streaming)
        return iter([{"input": "q", "target": "a"}, {"input": "q2", "target": "a2"}])

    monkeypatch.setattr(sources, "check_hub_reachable", lambda name: None)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    got = list(iter_raw_records("owner/name", hub_split="train"))
    assert calls == {"name": "owner/name", "split": "train", "streaming": True}
    assert [(r.source, r.line, r.data["input"]) for r in got] == [("hub:owner/name", 1, "q"), ("hub:owner/name", 2, "q2")]


# ------------------------------------------------------------------------------------ positions
def _write_inputs(tmp_path) -> list:
    """One file per input kind, with the layout quirks a seek must survive (blank lines, CRLF, a bad
    record, a BOM, elements over several lines, trailing data, several parquet row groups)."""
    rows = [{"input": f"q{i}", "target": "好" * (i % 5 + 1)} for i in range(12)]
    lines = b"".join(json.dumps(r, ensure_ascii=False).encode() + (b"\r\n" if i % 3 else b"\n\n") for i, r in
                     enumerate(rows)) + b"{bad\n  \n[1]\n"
    array = ("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False, indent=1) for r in rows) + ",\n{bad},\n\"s\"\n] x\n")
    paths = []
    for name, data in (("a.jsonl", lines), ("lines.json", lines), ("a.json", array.encode()),
                       ("bom.json", b"\xef\xbb\xbf" + array.encode()), ("comma.json", b"[1, {\"a\": 2},]")):
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    for name in ("a.jsonl", "a.json"):
        (tmp_path / (name + ".gz")).write_bytes(gzip.compress((tmp_path / name).read_bytes()))
        paths.append(tmp_path / (name + ".gz"))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet", row_group_size=5)
    (tmp_path / "a.parquet.gz").write_bytes(gzip.compress((tmp_path / "a.parquet").read_bytes()))
    return paths + [tmp_path / "a.parquet", tmp_path / "a.parquet.gz"]


def _records(path, **kw):
    return [(r.line, r.data, r.error.reason if r.error else None, r.position) for r in iter_raw_records(str(path), **kw)]


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_every_position_continues_with_the_records_after_it(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(sources, "_CHUNK", chunk)
    for path in _write_inputs(tmp_path):
        full = _records(path)
        assert len(full) >= 3 and [p["records"] for *_, p in full] == list(range(1, len(full) + 1)), path.name
        for k, (*_, position) in enumerate(full):
            position = json.loads(json.dumps(position))  # checkpoints store it as JSON
            assert _records(path, position=position) == full[k + 1:], (path.name, k)


def test_resuming_a_json_array_parses_only_what_follows(tmp_path, monkeypatch):
    p = tmp_path / "a.json"
    p.write_text(json.dumps([{"input": str(i), "target": "x"} for i in range(1000)]))
    position = list(iter_raw_records(str(p)))[899].position
    parsed = []
    real_loads = sources.orjson.loads
    monkeypatch.setattr(sources.orjson, "loads", lambda text: parsed.append(1) or real_loads(text))
    assert [r.data["input"] for r in iter_raw_records(str(p), position=position)] == [str(i) for i in range(900, 1000)]
    assert len(parsed) == 100


def test_an_old_count_only_position_reads_up_to_the_count(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"input": str(i), "target": "x"} for i in range(10)]), tmp_path / "a.parquet")
    got = [r.data["input"] for r in iter_raw_records(str(tmp_path / "a.parquet"), position={"records": 7})]
    assert got == ["7", "8", "9"]


def test_hub_stream_skips_only_when_opened_at_a_position(monkeypatch):
    import datasets

    class FakeStream:
        def __init__(self, rows):
            self.rows = rows

        def skip(self, n):
            skipped.append(n)
            return FakeStream(self.rows[n:])

        def __iter__(self):
            return iter(self.rows)

    skipped = []
    rows = [{"input": f"q{i}", "target": "a"} for i in range(5)]
    monkeypatch.setattr(sources, "check_hub_reachable", lambda name: None)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: FakeStream(rows))
    full = list(iter_raw_records("owner/name"))
    assert skipped == [] and [r.position for r in full] == [{"records": n} for n in range(1, 6)]
    rest = list(iter_raw_records("owner/name", position=full[2].position))
    assert skipped == [3] and [(r.line, r.data["input"]) for r in rest] == [(4, "q3"), (5, "q4")]
