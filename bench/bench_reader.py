"""Reading cost of the training stream per input kind: the first vs the last 1% of an epoch.

    git worktree add /tmp/before 3672451 && python bench/bench_reader.py --repo /tmp/before   # before the fix
    python bench/bench_reader.py --repo .             # this checkout (sft.tokens.stream.TrainStream)

What is measured: TrainStream itself (reading, parsing, format detection and validation, positions,
mixing draws, batch planning), with tokenization and collation stubbed out (a fixed 3-token sample,
the batch passed through), identically for both code versions, so that the reader dominates.
200k synthetic ShareGPT records (500-1500 characters, Chinese and ASCII) as .jsonl, a JSON array,
parquet (pyarrow defaults) and .jsonl.gz, generated once into --data-dir. shuffle_buffer 1000,
batch_size 10, group_by_length off.

- first 1%: a fresh stream, time to consume the batches of the first 2,000 records (two cycles).
- last 1%:  a stream resumed (load_state) at the cycle that starts 2,000 records before the end of the
            epoch, time to consume those two cycles. The state is what a checkpoint at that step holds
            (for the old code: record counts, plus line/byte for JSON lines; for the new code: the
            positions sft.data.sources gives, found by one read of the file before the clock starts).
- last 1%, running (new code only): the same last 2,000 records timed inside one stream that read the
            whole epoch from the start, i.e. without the one-time cost of opening at a position (for the
            .gz files that is decompressing up to it; for parquet decoding the row group). The old code
            reopens every source at every cycle, so its running cost is its resumed cost.
- mixed:    `a:0.8 b:0.2` with `a` the 200k file and `b` a 100k file of the same kind (b never wraps
            around). The mixed epoch ends when `a` is exhausted (~250k draws); the last 1% is the last
            2,000 draws before that, positioned by replaying the stream's own RNG.

Each measurement stops after --budget seconds: it is then reported as "> budget s (~ extrapolated s)",
the extrapolation being the per-record rate so far times 2,000 (a lower bound for the first 1% of the
old mixed mode, whose per-record cost grows with the position).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import sys
import time
from types import SimpleNamespace

RECORDS = 200_000
MIX_B = 100_000
WINDOW = 2_000
BUFFER = 1_000
BATCH = 10
SEED = 42
WEIGHTS = (0.8, 0.2)
KINDS = (".jsonl", ".json", ".parquet", ".jsonl.gz")


class OutOfTime(Exception):
    pass


# ------------------------------------------------------------------------------------ data
def synthetic_record(rng: random.Random) -> dict:
    words = ("the", "model", "answer", "question", "data", "train", "你好", "世界", "学习", "模型", "数据", "问题",
             "because", "therefore", "example", "42", "Python", "function", "返回", "结果")
    target = rng.randint(500, 1500)
    q_len = rng.randint(target // 5, target // 2)

    def text(n: int) -> str:
        out, size = [], 0
        while size < n:
            w = rng.choice(words)
            out.append(w)
            size += len(w) + 1
        return " ".join(out)

    return {"conversations": [{"from": "human", "value": text(q_len)}, {"from": "gpt", "value": text(target - q_len)}]}


def make_data(data_dir: str) -> None:
    """a (RECORDS) and b (MIX_B) in every kind; skipped when already there."""
    os.makedirs(data_dir, exist_ok=True)
    if all(os.path.exists(os.path.join(data_dir, f"{n}{k}")) for n in "ab" for k in KINDS):
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    rows = [synthetic_record(rng) for _ in range(RECORDS)]
    for name, part in (("a", rows), ("b", rows[:MIX_B])):
        lines = [json.dumps(r, ensure_ascii=False).encode() for r in part]
        base = os.path.join(data_dir, name)
        with open(base + ".jsonl", "wb") as f:
            f.write(b"\n".join(lines) + b"\n")
        with open(base + ".json", "wb") as f:  # what `sft_data_builder.py --output x.json` writes: an array
            f.write(b"[\n" + b",\n".join(lines) + b"\n]\n")
        with gzip.open(base + ".jsonl.gz", "wb", compresslevel=6) as f:
            f.write(b"\n".join(lines) + b"\n")
        pq.write_table(pa.Table.from_pylist(part), base + ".parquet")


# ------------------------------------------------------------------------------------ the code under test
def load_code(repo: str) -> SimpleNamespace:
    sys.path.insert(0, os.path.abspath(repo))
    try:
        import sft.tokens.stream as mod
        from sft.data.sources import iter_raw_records, parse_sources
        from sft.tokens.collate import StreamOptions
        from sft.tokens.encoding import EncodeOptions
        layout = "new"
    except ImportError:
        import sft.data as mod
        from sft.data import parse_sources, StreamOptions
        from sft.encoding import EncodeOptions
        iter_raw_records = None
        layout = "old"
    return SimpleNamespace(mod=mod, parse_sources=parse_sources, StreamOptions=StreamOptions,
                           EncodeOptions=EncodeOptions, iter_raw_records=iter_raw_records, layout=layout)


class Stub:
    """Tokenization and collation stubbed out; stops the run when the time budget is spent."""

    def __init__(self, code: SimpleNamespace):
        self.records, self.deadline = 0, float("inf")
        sample = SimpleNamespace(input_ids=[1, 2, 3], labels=[1, 2, 3], truncated=False)

        def encode(conversation, tokenizer, options, stats=None):
            self.records += 1
            if time.perf_counter() > self.deadline:
                raise OutOfTime
            return sample

        code.mod.encode_conversation = encode
        code.mod.collate_batch = lambda batch, tokenizer, options: {"n": len(batch)}


def listify(value):
    return [listify(v) for v in value] if isinstance(value, (tuple, list)) else value


# ------------------------------------------------------------------------------------ positions
def mixed_counts(total_a: int) -> tuple[int, list[int], object, int]:
    """(cycle index, per-source record counts at its start, RNG state then, records in the epoch) of
    the mixed stream's cycle that starts WINDOW draws before source a runs out, replaying its RNG."""
    rng = random.Random(SEED)
    counts, history = [0, 0], []
    while True:
        if sum(counts) % BUFFER == 0:
            history.append((list(counts), rng.getstate()))
        index = rng.choices(range(2), weights=WEIGHTS)[0]
        if index == 0 and counts[0] == total_a:
            break
        counts[index] += 1
    cycle = (sum(counts) - WINDOW) // BUFFER
    return cycle, *history[cycle], sum(counts)


def positions_at(code: SimpleNamespace, path: str, count: int):
    """What the stream saves for `path` after `count` records."""
    if count == 0:
        return None if code.layout == "new" else [0, 0, 0]
    if code.layout == "new":  # the reader's own position: one read of the file, off the clock
        for rec in code.iter_raw_records(path):
            if rec.position["records"] == count:
                return rec.position
    if path.endswith((".jsonl", ".jsonl.gz")):  # [line, byte offset, records] (one record per line here)
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            offset = sum(len(next(f)) for _ in range(count))
        return [count, offset, count]
    return [count, 0, count]


def resume_state(code, paths: list[str], mixed: bool) -> dict:
    if mixed:
        cycle, counts, rng, _ = mixed_counts(RECORDS)
        rng = listify(rng)
    else:
        cycle, counts, rng = (RECORDS - WINDOW) // BUFFER, [RECORDS - WINDOW], None
    cycle_state = {"epoch": 0, "source": 0, "rng": rng,
                   "positions": [positions_at(code, p, n) for p, n in zip(paths, counts)]}
    batches = cycle * (BUFFER // BATCH)
    return {"cycle": cycle, "cycle_state": cycle_state, "cycle_start": batches, "offset": 0, "batches": batches,
            "rank": 0, "world_size": 1, "counters": {}}


# ------------------------------------------------------------------------------------ measuring
def measure(code, stub: Stub, specs: list[str], state: dict | None, budget: float) -> str:
    options = code.StreamOptions(batch_size=BATCH, shuffle_buffer=BUFFER, group_by_length=False, seed=SEED)
    stream = code.mod.TrainStream(code.parse_sources(specs), None, code.EncodeOptions(max_length=None), options)
    if state is not None:
        stream.load_state(json.loads(json.dumps(state)))
    stub.records = 0
    start = time.perf_counter()
    stub.deadline = start + budget
    want, seen = WINDOW, 0
    try:
        for batch in stream:
            seen += batch["n"]
            if seen >= want:
                break
    except OutOfTime:
        elapsed = time.perf_counter() - start
        rate = elapsed / max(stub.records, 1)
        return f"> {budget:.0f} s (~{rate * WINDOW:,.0f} s)"
    return f"{time.perf_counter() - start:.2f} s"


def measure_running(code, stub: Stub, specs: list[str], epoch: int, budget: float) -> str:
    """Time the last WINDOW records of an epoch of `epoch` records inside one running stream."""
    options = code.StreamOptions(batch_size=BATCH, shuffle_buffer=BUFFER, group_by_length=False, seed=SEED)
    stream = code.mod.TrainStream(code.parse_sources(specs), None, code.EncodeOptions(max_length=None), options)
    stub.deadline = time.perf_counter() + budget
    seen, start = 0, None
    try:
        for batch in stream:
            seen += batch["n"]
            if start is None and seen >= epoch - WINDOW:
                start = time.perf_counter()
            if seen >= epoch:
                return f"{time.perf_counter() - start:.2f} s"
    except OutOfTime:
        return f"(epoch not read within {budget:.0f} s)"
    return "?"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=".", help="the checkout whose sft/ is measured")
    parser.add_argument("--data-dir", default="/tmp/bench_reader", help="where the synthetic data is generated")
    parser.add_argument("--budget", type=float, default=15.0, help="seconds before a measurement is cut off")
    parser.add_argument("--kinds", nargs="*", default=list(KINDS))
    args = parser.parse_args(argv)
    made = time.perf_counter()
    make_data(args.data_dir)
    print(f"data ready in {time.perf_counter() - made:.0f} s: {args.data_dir}", file=sys.stderr)
    code = load_code(args.repo)
    stub = Stub(code)
    print(f"code: {args.repo} ({code.layout} layout)\n")
    running = code.layout == "new"
    head = ["first 1%", "last 1%, resumed"] + (["last 1%, running"] if running else [])
    print("| input | " + " | ".join([f"plain: {h}" for h in head] + [f"mixed 0.8/0.2: {h}" for h in head]) + " |")
    print("|---" * (1 + 2 * len(head)) + "|")
    for kind in args.kinds:
        a, b = (os.path.join(args.data_dir, f"{n}{kind}") for n in "ab")
        cells = []
        for specs, paths, mixed in (([a], [a], False), ([f"{a}:{WEIGHTS[0]}", f"{b}:{WEIGHTS[1]}"], [a, b], True)):
            cells.append(measure(code, stub, specs, None, args.budget))
            cells.append(measure(code, stub, specs, resume_state(code, paths, mixed), args.budget))
            if running:
                epoch = mixed_counts(RECORDS)[3] if mixed else RECORDS
                cells.append(measure_running(code, stub, specs, epoch, 4 * args.budget))
        print(f"| {kind} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
