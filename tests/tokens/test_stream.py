"""sft.tokens.stream.TrainStream: one open reader per source, exact and cheap resume on every input kind,
and the builder's reject policy (same reason codes) while training."""
import gzip
import json
from itertools import islice

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import sft.data.sources as sources
import sft.tokens.stream as stream_module
from sft.data.formats import read_conversations
from sft.data.sources import parse_sources
from sft.tokens.collate import StreamOptions
from sft.tokens.encoding import EncodeOptions
from sft.tokens.stream import TrainStream

OPTIONS = StreamOptions(batch_size=2, shuffle_buffer=10, max_length=64, seed=3)
ENCODE = EncodeOptions(max_length=64)


def _rows(n, tag):
    return [{"input": f"{tag} question {i} " + "x" * (i % 7), "target": f"answer {i} " + "好" * (i % 5 + 1)}
            for i in range(n)]


def _write(tmp_path, kind, n=60, tag="a"):
    rows = _rows(n, tag)
    path = tmp_path / f"{tag}{kind}"
    if kind == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    elif kind == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=16)
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        path.write_bytes(gzip.compress(text) if kind.endswith(".gz") else text)
    return str(path)


INPUTS = {
    "json_array": lambda tmp: [_write(tmp, ".json")],
    "parquet": lambda tmp: [_write(tmp, ".parquet")],
    "jsonl_gz": lambda tmp: [_write(tmp, ".jsonl.gz")],
    "jsonl": lambda tmp: [_write(tmp, ".jsonl")],
    "mixed": lambda tmp: [_write(tmp, ".json") + ":0.8", _write(tmp, ".parquet", n=25, tag="b") + ":0.2"],
}


def _stream(specs, tokenizer, **options):
    return TrainStream(parse_sources(specs), tokenizer, ENCODE, StreamOptions(**{**OPTIONS.__dict__, **options}))


def _ids(batches):
    return [b["sample_ids"] for b in batches]


@pytest.fixture
def parsed(monkeypatch):
    """Counts the records the reader layer materializes (every record parsed or converted from parquet)."""
    count = [0]
    real = sources.RawRecord

    def counted(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(sources, "RawRecord", counted)
    return count


@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_resume_reads_one_cycle_and_continues_with_the_same_samples(kind, tmp_path, qwen_tokenizer, parsed):
    specs = INPUTS[kind](tmp_path)
    straight = _stream(specs, qwen_tokenizer)
    batches, states = [], {}
    for batch in islice(iter(straight), 80):  # 60 records a source: the run crosses an epoch boundary
        batches.append(batch)
        states[len(batches)] = json.loads(json.dumps(straight.state_at(len(batches))))  # as a checkpoint has it
    for done in (23, 47, 71):  # mid-cycle, late in the epoch, in the next epoch
        resumed = _stream(specs, qwen_tokenizer)
        resumed.load_state(states[done])
        parsed[0] = 0
        rest = iter(resumed)
        first = next(rest)
        assert parsed[0] <= OPTIONS.shuffle_buffer, (kind, done, parsed[0])
        assert _ids([first, *islice(rest, 80 - done - 1)]) == _ids(batches[done:]), (kind, done)


@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_each_source_is_opened_once_per_epoch_not_per_cycle(kind, tmp_path, qwen_tokenizer, parsed, monkeypatch):
    specs = INPUTS[kind](tmp_path)
    opened = []
    real = stream_module.iter_raw_records

    def counting(path, **kw):
        opened.append(path)
        return real(path, **kw)

    monkeypatch.setattr(stream_module, "iter_raw_records", counting)
    stream = _stream(specs, qwen_tokenizer)
    list(islice(iter(stream), 25))  # 50 records: 5 cycles, and 50 mixed draws
    assert stream.counters["records"] == 50 == parsed[0]
    assert sorted(opened) == sorted(spec.rpartition(":")[0] or spec for spec in specs)


def test_a_checkpoint_with_old_list_positions_still_resumes(tmp_path, qwen_tokenizer):
    specs = INPUTS["jsonl"](tmp_path) + [_write(tmp_path, ".json", n=30, tag="b")]
    straight = _stream(specs, qwen_tokenizer)
    batches = list(islice(iter(straight), 50))
    state = straight.state_at(37)
    positions = state["cycle_state"]["positions"]
    # Before positions were dicts: [line, next byte, records] for JSON lines, [line, 0, records] otherwise.
    state["cycle_state"]["positions"] = [[p["line"], p.get("offset", 0) if i == 0 else 0, p["records"]]
                                         if p else [0, 0, 0] for i, p in enumerate(positions)]
    resumed = _stream(specs, qwen_tokenizer)
    resumed.load_state(state)
    assert _ids(islice(iter(resumed), 13)) == _ids(batches[37:])


def test_training_rejects_records_with_the_builders_reason_codes(tmp_path, qwen_tokenizer):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"input": "q", "target": "a"}).encode()
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n{bad\n[1, 2]\n" + good + b"\n" + json.dumps({"x": 1}).encode() + b"\n")
    builder = [item.error.reason for item in read_conversations(str(path)) if item.error]
    stream = TrainStream(parse_sources([str(path)]), qwen_tokenizer, ENCODE, OPTIONS,
                         rejects_path=str(tmp_path / "rejects.jsonl"))
    next(iter(stream))
    rows = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    training = [r["reason"] for r in rows[:4]]  # the first epoch (the stream goes round again)
    assert training == builder == ["bom", "invalid_json", "not_an_object", "missing_field"]
    assert [r["line"] for r in rows[:4]] == [1, 2, 3, 5]
    assert "byte order mark" in rows[0]["error"] and rows[1]["raw"] == "{bad"
