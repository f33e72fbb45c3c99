"""Streaming training data: files -> canonical conversations -> encoded samples -> micro-batches.

The stream yields whole, already collated micro-batches (the Trainer's DataLoader runs with batch
size 1 and `unwrap_collate`). That lets length grouping decide batch composition (and packing
decide the rows), and makes every step's data a pure function of (seed, epoch, cycle):

    cycle = read `shuffle_buffer` samples of this rank -> encode -> plan batches (grouped by length
            or not, shuffled with a per-cycle seed) -> collate (pad or pack) -> yield them

Reading: each source is read through sft.data.sources (the builder's reader, the builder's checks and
reason codes) and stays open across cycles and mixed draws, so an epoch reads every file once.

Exact resume: the stream remembers the reader position at the start of each cycle (per source, the
sources position of its next record: a byte offset, a parquet row group + row, ...). A checkpoint
stores (cycle start position, batches already used from that cycle); resuming opens the files at
that position, re-reads and re-encodes ONE cycle and skips the used batches. Resume cost is bounded
by the buffer size, whatever the number of steps already done.

Several processes: rank r keeps records whose index in the file is r mod world_size (each sample is
read by exactly one rank per epoch); r is the global rank, numbered across all machines, so a record's
owner does not depend on how the processes sit on machines. A saved position is valid only for the
same world size (the training run checks the checkpoint's topology first and tells the user what to do).
With world_size > 1 accelerate wraps an IterableDataset in an IterableDatasetShard that keeps element r
of every `world_size` consecutive elements, so the stream emits its own batch at position r and cheap
placeholders elsewhere.
"""
from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from sft.data.formats import normalize_records
from sft.data.json_checks import too_deep_error
from sft.data.sources import RawRecord, Source, iter_raw_records
from sft.tokens.collate import StreamOptions, collate_batch
from sft.tokens.encoding import EncodeOptions, EncodeStats, encode_conversation
from sft.tokens.plan import plan_batches

logger = logging.getLogger(__name__)

PLACEHOLDER = {"placeholder": True}


# ------------------------------------------------------------------------------------ the stream


@dataclass
class ReaderState:
    epoch: int = 0
    source: int = 0  # sequential mode: which source is being read
    # per source: the sft.data.sources position of its next record (None: the start of the file)
    positions: list[dict | None] = field(default_factory=list)
    rng: Any = None  # mixing RNG state (weighted mode)
    # per source: (open reader, the position it stands at). Not saved: a reader is reopened only when
    # the position differs (after a resume or a restart), never per cycle or per mixed record.
    open: dict[int, tuple[Iterator[RawRecord], dict | None]] = field(default_factory=dict, repr=False)

    def restart(self, n_sources: int) -> None:
        self.positions = [None] * n_sources
        self.open.clear()


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
        self._formats: dict[str, str] = {}  # source -> format, detected once per file from its first record
        self._cycles: dict[int, dict] = {}  # cycle index -> {"start": batch index, "n": count, "state": ...}
        self._resume: dict | None = None
        self.reject_reasons: Counter = Counter()  # reason -> records rejected or dropped by this process
        self.reading = False  # True while the stream reads records (no training step is running)

    # ---- resume

    def state_at(self, batches_consumed: int) -> dict:
        """The position after `batches_consumed` micro-batches of this rank (for a checkpoint)."""
        for index in sorted(self._cycles, reverse=True):
            cycle = self._cycles[index]
            if cycle["start"] <= batches_consumed <= cycle["start"] + cycle["n"]:
                # the counters as the cycle began: a resume reads (and counts) this cycle again
                return {"cycle": index, "cycle_state": cycle["state"], "cycle_start": cycle["start"],
                        "offset": batches_consumed - cycle["start"], "batches": batches_consumed,
                        "rank": self.rank, "world_size": self.world_size, "counters": dict(cycle["counters"])}
        raise RuntimeError(f"no stream position recorded for batch {batches_consumed} (cycles {sorted(self._cycles)})")

    def load_state(self, state: dict) -> None:
        if state.get("world_size", 1) != self.world_size:
            raise ValueError(
                f"the checkpoint was written by {state.get('world_size')} processes but this run has "
                f"{self.world_size}: resume with the same number of processes, or start a new run from the "
                "checkpoint's weights (--model CHECKPOINT, without --resume_from_checkpoint)")
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
            reader = ReaderState(positions=[None] * len(self.sources),
                                 rng=random.Random(options.seed).getstate() if weighted else None)
            cycle_index, emitted, skip = 0, 0, 0
        self._cycles.clear()
        while True:
            start_state, start_counters = _reader_to_state(reader), dict(self.counters)
            self.reading = True
            try:
                samples = self._read_cycle(reader)
            finally:
                self.reading = False
            rng = random.Random(f"{options.seed}:{cycle_index}")
            batches = plan_batches(samples, options, rng)
            self._cycles[cycle_index] = {"start": emitted, "n": len(batches), "state": start_state,
                                         "counters": start_counters}
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
        # A cycle keeps reading until it has a sample: with none usable it would read (and write rejects)
        # forever. Stop once a whole pass gave nothing: the first epoch end when this cycle began at an
        # epoch start, else the second (the pass that began mid-epoch may have had samples earlier).
        at_epoch_start = reader.source == 0 and all(p is None for p in reader.positions)
        empty_ends = 0
        while len(samples) < budget:
            for sample in self._read_some(reader, budget - len(samples)):
                if sample is not None:
                    samples.append(sample)
            if reader.source == -1:  # epoch finished inside this cycle: close the cycle there
                if not samples:
                    empty_ends += 1
                    if empty_ends >= (1 if at_epoch_start else 2):
                        raise ValueError(self._nothing_usable_message())
                reader.source = 0
                reader.epoch += 1
                reader.restart(len(self.sources))
                if samples:
                    break
        return samples

    def _nothing_usable_message(self) -> str:
        counts = " ".join(f"{reason}={n}" for reason, n in self.reject_reasons.most_common()) or "no records"
        fixes = []
        if self.reject_reasons.get("dropped"):
            fixes.append(f"'dropped' records have no trained token within --max_length "
                         f"{self.encode_options.max_length}: raise --max_length")
        if set(self.reject_reasons) - {"dropped"}:
            fixes.append("fix or convert the data (sft_data_builder.py writes every bad record with its reason)")
        if not self.reject_reasons:
            fixes.append("this process's share of --data is empty: give more records or fewer processes")
        return (f"no usable sample in a whole pass over the training data (process {self.rank}): every record was "
                f"rejected or dropped, by reason: {counts} (each is in {self.rejects_path}). Fix: {'; '.join(fixes)}")

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
                    reader.positions[index] = None
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
        skip_first = self.options.skip_first if index == 0 else 0
        produced = 0
        while produced < limit:
            rec = self._next_raw(index, reader)
            if rec is None:
                return
            record_index = rec.position["records"] - 1
            if record_index < skip_first or (record_index - skip_first) % self.world_size != self.rank:
                continue
            produced += 1
            yield self._encode_record(index, rec)

    def _next_raw(self, index: int, reader: ReaderState) -> RawRecord | None:
        """The next record of source `index` from its open reader (opened at the saved position if needed)."""
        position = reader.positions[index]
        records, at = reader.open.get(index, (None, None))
        if records is None or at is not position:
            records = iter_raw_records(self.sources[index].path, position=position)
        rec = next(records, None)
        if rec is None:
            reader.open.pop(index, None)
            return None
        reader.positions[index] = rec.position
        reader.open[index] = (records, rec.position)
        return rec

    def _encode_record(self, index: int, rec: RawRecord) -> dict | None:
        """The encoded sample of one raw record, or None (rejected or dropped, written to the rejects file)."""
        source = self.sources[index]
        self.counters["records"] += 1
        fmt = source.fmt if source.fmt != "auto" else None
        item = next(normalize_records([rec], fmt, None, self._formats))  # the builder's checks, the same codes
        if item.error is not None:
            return self._reject(source, rec, item.error.reason, item.error.detail)
        sample_id = f"{os.path.basename(source.path)}:{rec.line}"
        try:
            encoded = encode_conversation(item.conversation, self.tokenizer, self.encode_options, self.encode_stats)
        except ValueError as err:
            return self._reject(source, rec, "cannot_render", str(err))
        except RecursionError as err:  # tools or arguments nested ~1000 levels: the template's JSON cannot write them
            deep = too_deep_error(rec.data, err)
            return self._reject(source, rec, deep.reason, deep.detail)
        if encoded is None:
            self.counters["dropped"] += 1
            reason = getattr(self.encode_stats, "last_drop", None) or "no supervised token within --max_length"
            self._write_reject(source, rec, "dropped", reason)
            return None
        self.counters["truncated"] += int(encoded.truncated)
        return {"input_ids": encoded.input_ids, "labels": encoded.labels, "id": sample_id}

    def _reject(self, source: Source, rec: RawRecord, reason: str, detail: str) -> None:
        self.counters["rejected"] += 1
        self._write_reject(source, rec, reason, detail)
        return None

    def _write_reject(self, source: Source, rec: RawRecord, reason: str, detail: str) -> None:
        """One row of the rejects file, shaped like the builder's: reason is a code of REASONS."""
        self.reject_reasons[reason] += 1
        if not self.rejects_path:
            return
        Path(self.rejects_path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.rejects_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"source": source.path, "line": rec.line, "reason": reason, "error": detail,
                                "raw": rec.raw}, ensure_ascii=False) + "\n")


def _reader_to_state(reader: ReaderState) -> dict:
    return {"epoch": reader.epoch, "source": reader.source, "positions": list(reader.positions),
            "rng": _listify(reader.rng)}


def _reader_from_state(state: dict, n_sources: int) -> ReaderState:
    positions = [_position_from_state(p) for p in state["positions"]]
    if len(positions) != n_sources:
        raise ValueError(f"the checkpoint's data position covers {len(positions)} files but --data has "
                         f"{n_sources}: resume with the same --data")
    return ReaderState(epoch=state["epoch"], source=state["source"], positions=positions, rng=state["rng"])


def _position_from_state(saved: Any) -> dict | None:
    """A saved reader position; checkpoints written before sources positions hold [line, byte, records]
    (a byte offset for JSON lines, 0 for the other kinds, which are then read up to the count once)."""
    if not isinstance(saved, list):
        return saved
    line, offset, records = saved
    if records == 0:
        return None
    return {"records": records, "offset": offset, "line": line} if offset else {"records": records}


def _listify(value: Any) -> Any:
    return [_listify(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuplify(value: Any) -> Any:
    return tuple(_tuplify(v) for v in value) if isinstance(value, (tuple, list)) else value
