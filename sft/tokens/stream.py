"""Streaming training data: files -> canonical conversations -> encoded samples -> micro-batches.

The stream yields whole, already collated micro-batches (the Trainer's DataLoader runs with batch
size 1 and `unwrap_collate`). That lets length grouping decide batch composition (and packing
decide the rows), and makes every step's data a pure function of (seed, epoch, cycle):

    cycle = read `shuffle_buffer` samples of this rank -> encode -> plan batches (grouped by length
            or not, shuffled with a per-cycle seed) -> collate (pad or pack) -> yield them

Exact resume: the stream remembers the reader position at the start of each cycle. A checkpoint
stores (cycle start position, batches already used from that cycle); resuming seeks the files to
that position, re-reads and re-encodes ONE cycle and skips the used batches. Resume cost is bounded
by the buffer size, whatever the number of steps already done.

Several processes: rank r keeps records whose index in the file is r mod world_size (each sample is
read by exactly one rank per epoch). With world_size > 1 accelerate wraps an IterableDataset in an
IterableDatasetShard that keeps element r of every `world_size` consecutive elements, so the stream
emits its own batch at position r and cheap placeholders elsewhere.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from sft.conversation import RecordError, validate_conversation
from sft.data.formats import detect_format, to_conversation
from sft.data.sources import Source, is_line_based
from sft.tokens.collate import StreamOptions, collate_batch
from sft.tokens.encoding import EncodeOptions, EncodeStats, encode_conversation
from sft.tokens.plan import plan_batches

logger = logging.getLogger(__name__)

PLACEHOLDER = {"placeholder": True}


# ------------------------------------------------------------------------------------ sources


def _iter_lines(path: str, offset: int, line_no: int) -> Iterator[tuple[int, int, int, bytes]]:
    """Yield (line_no, start_offset, next_offset, raw_line) of a JSON-lines file from a byte offset."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        if offset:
            if path.endswith(".gz"):  # gzip cannot seek cheaply: decompress and drop (no JSON parsing)
                remaining = offset
                while remaining:
                    chunk = f.read(min(remaining, 1 << 20))
                    if not chunk:
                        break
                    remaining -= len(chunk)
            else:
                f.seek(offset)
        pos = offset
        for raw in f:
            start, pos = pos, pos + len(raw)
            line_no += 1
            if raw.strip():
                yield line_no, start, pos, raw


def _iter_other(path: str, skip: int) -> Iterator[tuple[int, Any]]:
    """Non-JSON-lines inputs (JSON arrays, parquet, hub ids) through the builder's reader."""
    from sft.data.sources import iter_raw_records

    for index, rec in enumerate(iter_raw_records(path)):
        if index < skip:
            continue
        yield rec.line, rec


# ------------------------------------------------------------------------------------ the stream


@dataclass
class ReaderState:
    epoch: int = 0
    source: int = 0  # sequential mode: which source is being read
    positions: list[list[int]] = field(default_factory=list)  # per source: [line_no, byte_offset, records]
    rng: Any = None  # mixing RNG state (weighted mode)


class TrainStream(torch.utils.data.IterableDataset):
    """An endless stream of collated micro-batches for one rank (epochs roll over and reshuffle)."""

    def __init__(self, sources: list[Source], tokenizer, encode_options: EncodeOptions, options: StreamOptions,
                 rank: int = 0, world_size: int = 1, rejects_path: str | None = None):
        super().__init__()
        self.sources = sources
        self.tokenizer = tokenizer
        self.encode_options = encode_options
        self.options = options
        self.rank, self.world_size = rank, world_size
        self.rejects_path = rejects_path
        self.counters = {"records": 0, "rejected": 0, "dropped": 0, "truncated": 0}
        self.encode_stats = EncodeStats()
        self._formats: dict[int, str] = {}  # detected once per file, from its first record
        self._cycles: dict[int, dict] = {}  # cycle index -> {"start": batch index, "n": count, "state": ...}
        self._resume: dict | None = None

    # ---- resume

    def state_at(self, batches_consumed: int) -> dict:
        """The position after `batches_consumed` micro-batches of this rank (for a checkpoint)."""
        for index in sorted(self._cycles, reverse=True):
            cycle = self._cycles[index]
            if cycle["start"] <= batches_consumed <= cycle["start"] + cycle["n"]:
                return {"cycle": index, "cycle_state": cycle["state"], "cycle_start": cycle["start"],
                        "offset": batches_consumed - cycle["start"], "batches": batches_consumed,
                        "rank": self.rank, "world_size": self.world_size, "counters": dict(self.counters)}
        raise RuntimeError(f"no stream position recorded for batch {batches_consumed} (cycles {sorted(self._cycles)})")

    def load_state(self, state: dict) -> None:
        if state.get("world_size", 1) != self.world_size:
            raise ValueError(
                f"the checkpoint was written by {state.get('world_size')} processes but this run has "
                f"{self.world_size}: resume with the same number of processes")
        self._resume = state

    # ---- iteration

    def __iter__(self):
        options = self.options
        if self._resume:
            reader = _reader_from_state(self._resume["cycle_state"], len(self.sources))
            cycle_index, emitted, skip = self._resume["cycle"], self._resume["cycle_start"], self._resume["offset"]
            self.counters.update(self._resume.get("counters", {}))
        else:
            weighted = self.sources[0].weight is not None  # only mixing needs an RNG in the position
            reader = ReaderState(positions=[[0, 0, 0] for _ in self.sources],
                                 rng=random.Random(options.seed).getstate() if weighted else None)
            cycle_index, emitted, skip = 0, 0, 0
        self._cycles.clear()
        while True:
            start_state = _reader_to_state(reader)
            samples = self._read_cycle(reader)
            rng = random.Random(f"{options.seed}:{cycle_index}")
            batches = plan_batches(samples, options, rng)
            self._cycles[cycle_index] = {"start": emitted, "n": len(batches), "state": start_state}
            for old in [i for i in self._cycles if i < cycle_index - 32]:
                del self._cycles[old]
            for position, batch in enumerate(batches):
                if position < skip:
                    continue
                collated = collate_batch(batch, self.tokenizer, options)
                for slot in range(self.world_size):
                    yield collated if slot == self.rank else PLACEHOLDER
            emitted += len(batches)
            cycle_index += 1
            skip = 0

    def _read_cycle(self, reader: ReaderState) -> list[dict]:
        """Read up to `shuffle_buffer` encoded samples of this rank, advancing the reader."""
        samples: list[dict] = []
        budget = self.options.shuffle_buffer
        empty_epochs = 0
        while len(samples) < budget:
            got_any = False
            for sample in self._read_some(reader, budget - len(samples)):
                got_any = True
                if sample is not None:
                    samples.append(sample)
            if samples or got_any:
                empty_epochs = 0
            else:
                empty_epochs += 1
                if empty_epochs > 1:
                    raise ValueError(
                        "the training data yielded no usable sample for this process in a whole epoch: every "
                        f"record was rejected or dropped (see {self.rejects_path}); check --data / --max_length")
            if reader.source == -1:  # epoch finished inside this cycle: close the cycle there
                reader.source = 0
                reader.epoch += 1
                reader.positions = [[0, 0, 0] for _ in self.sources]
                if samples:
                    break
        return samples

    def _read_some(self, reader: ReaderState, want: int) -> Iterator[dict | None]:
        """Yield up to `want` records (encoded sample, or None when rejected) from the current source."""
        weighted = self.sources[0].weight is not None
        if weighted:
            rng = random.Random()
            rng.setstate(_tuplify(reader.rng))
            weights = [s.weight for s in self.sources]
            count = 0
            while count < want:
                index = rng.choices(range(len(self.sources)), weights=weights)[0]
                item = next(self._records(index, reader, 1), "END")
                if item == "END":  # this source wrapped around
                    reader.positions[index] = [0, 0, 0]
                    if index == 0:
                        reader.source = -1
                        reader.rng = rng.getstate()
                        return
                    continue
                count += 1
                yield item
            reader.rng = rng.getstate()
            return
        count = 0
        while count < want:
            for item in self._records(reader.source, reader, want - count):
                count += 1
                yield item
            if count < want:
                if reader.source + 1 < len(self.sources):
                    reader.source += 1
                else:
                    reader.source = -1
                    return

    def _records(self, index: int, reader: ReaderState, limit: int) -> Iterator[dict | None]:
        """Up to `limit` own-rank records of source `index`, advancing its saved position."""
        source = self.sources[index]
        position = reader.positions[index]
        skip_first = self.options.skip_first if index == 0 else 0
        produced = 0
        if is_line_based(source.path):
            for line_no, _, next_offset, raw in _iter_lines(source.path, position[1], position[0]):
                record_index = position[2]
                position[:] = [line_no, next_offset, record_index + 1]
                if record_index < skip_first or (record_index - skip_first) % self.world_size != self.rank:
                    continue
                produced += 1
                yield self._encode_raw(index, line_no, raw)
                if produced >= limit:
                    return
            return
        for line_no, rec in _iter_other(source.path, position[2]):
            record_index = position[2]
            position[:] = [line_no, 0, record_index + 1]
            if record_index < skip_first or (record_index - skip_first) % self.world_size != self.rank:
                continue
            produced += 1
            yield self._encode_record(index, line_no, rec.data, rec.error)
            if produced >= limit:
                return

    def _encode_raw(self, index: int, line_no: int, raw: bytes) -> dict | None:
        try:
            record = json.loads(raw.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            self.counters["records"] += 1
            return self._reject(self.sources[index], line_no, f"invalid_json: {err}", raw.decode("utf-8", "replace"))
        return self._encode_record(index, line_no, record, None)

    def _encode_record(self, index: int, line_no: int, record: Any, error: Any) -> dict | None:
        source = self.sources[index]
        self.counters["records"] += 1
        if error:
            return self._reject(source, line_no, str(error), record)
        try:
            if not isinstance(record, dict):
                raise RecordError("not_object", "the record is not a JSON object")
            fmt = source.fmt if source.fmt != "auto" else self._formats.get(index)
            if fmt is None:
                fmt = self._formats[index] = detect_format(record)
            conversation = to_conversation(record, fmt)
            validate_conversation(conversation)
        except RecordError as err:
            return self._reject(source, line_no, str(err), record)
        sample_id = f"{os.path.basename(source.path)}:{line_no}"
        try:
            encoded = encode_conversation(conversation, self.tokenizer, self.encode_options, self.encode_stats)
        except ValueError as err:
            return self._reject(source, line_no, str(err), record)
        if encoded is None:
            self.counters["dropped"] += 1
            reason = getattr(self.encode_stats, "last_drop", None) or "no supervised token within --max_length"
            self._write_reject(source, line_no, f"dropped: {reason}", record)
            return None
        self.counters["truncated"] += int(encoded.truncated)
        return {"input_ids": encoded.input_ids, "labels": encoded.labels, "id": sample_id}

    def _reject(self, source: Source, line_no: int, reason: str, raw: Any) -> None:
        self.counters["rejected"] += 1
        self._write_reject(source, line_no, reason, raw)
        return None

    def _write_reject(self, source: Source, line_no: int, reason: str, raw: Any) -> None:
        if not self.rejects_path:
            return
        Path(self.rejects_path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.rejects_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"source": source.path, "line": line_no, "reason": reason, "raw": raw},
                               ensure_ascii=False, default=str) + "\n")


def _reader_to_state(reader: ReaderState) -> dict:
    return {"epoch": reader.epoch, "source": reader.source, "positions": [list(p) for p in reader.positions],
            "rng": _listify(reader.rng)}


def _reader_from_state(state: dict, n_sources: int) -> ReaderState:
    positions = [list(p) for p in state["positions"]]
    if len(positions) != n_sources:
        raise ValueError(f"the checkpoint's data position covers {len(positions)} files but --data has "
                         f"{n_sources}: resume with the same --data")
    return ReaderState(epoch=state["epoch"], source=state["source"], positions=positions, rng=state["rng"])


def _listify(value: Any) -> Any:
    return [_listify(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuplify(value: Any) -> Any:
    return tuple(_tuplify(v) for v in value) if isinstance(value, (tuple, list)) else value


# ------------------------------------------------------------------------------------ batches


def count_records(sources: list[Source]) -> int:
    """Cheap record count (non-empty lines for JSON lines; the reader otherwise) for --num_train_epochs."""
    total = 0
    for source in sources:
        if is_line_based(source.path):
            total += sum(1 for _ in _iter_lines(source.path, 0, 0))
        else:
            total += sum(1 for _ in _iter_other(source.path, 0))
    return total
