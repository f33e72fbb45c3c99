"""Cost of the builder's duplicate-key check (sft.data.sources.has_duplicate_keys) next to the rest of the
per-record work it runs beside (parse + normalize, then sft.data.steps.record_outcome), in one process so
that the ratio holds on a busy machine. Prints microseconds per record (minimum of --repeat runs).

    python bench/make_firefly.py --rows 100000 --output bench/out/firefly-100k.jsonl
    python bench/bench_duplicate_keys.py --input bench/out/firefly-100k.jsonl
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sft.data.formats import normalize_records  # noqa: E402
from sft.data.json_checks import has_duplicate_keys  # noqa: E402
from sft.data.sources import parse_json_lines  # noqa: E402
from sft.data.steps import StepConfig, record_outcome  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", default="bench/out/firefly-1.1M.jsonl")
    p.add_argument("--records", type=int, default=5000)
    p.add_argument("--repeat", type=int, default=15)
    args = p.parse_args()
    with open(args.input, "rb") as f:
        lines = list(itertools.islice(f, args.records))
    cfg = StepConfig(None, 100_000, "hash", False)  # the builder's defaults: exact dedup, no stats

    def best(fn) -> float:
        return min(timeit.repeat(fn, number=1, repeat=args.repeat)) / len(lines) * 1e6

    items = list(normalize_records(parse_json_lines(lines, "x"), None, 100_000, {}))
    parse = best(lambda: list(normalize_records(parse_json_lines(lines, "x"), None, 100_000, {})))
    step = best(lambda: [record_outcome(i, cfg) for i in items])  # includes the check
    check = best(lambda: [has_duplicate_keys(i.raw) for i in items])
    flagged = sum(has_duplicate_keys(i.raw) for i in items)
    print(f"{len(lines)} records of {args.input}, {sum(map(len, lines)) / len(lines):.0f} bytes each on average")
    print(f"per record: parse + normalize {parse:.1f} us, record_outcome {step:.1f} us, of which the duplicate-key "
          f"check {check:.1f} us = {check / (parse + step):.1%} of the per-record work; {flagged} flagged")


if __name__ == "__main__":
    main()
