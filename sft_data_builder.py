"""Build a checked, deduplicated ShareGPT dataset from raw files (Firefly, ShareGPT, OpenAI, Alpaca, ...).

    python sft_data_builder.py firefly-train-1.1M.jsonl --output data/firefly.jsonl --stats --val_ratio 0.01

Exit status: 0 done, 1 --strict found a bad record, 2 user error (bad flag, missing file, offline hub),
130 interrupted. See docs/data_builder.md.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

from sft.data.builder import BuildError, BuildOptions, StrictError, build
from sft.data.formats import FORMATS
from sft.data.sources import SourceError


def parse_args(argv: list[str] | None) -> BuildOptions:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", help="input files (.jsonl/.json/.parquet, optionally .gz) or hub dataset ids")
    p.add_argument("--output", required=True, help="x.json writes a JSON array, x.jsonl JSON lines")
    p.add_argument("--format", choices=FORMATS, help="force the input format (default: detect per file)")
    p.add_argument("--rejects", help="rejects file (default: <output stem>.rejects.jsonl)")
    p.add_argument("--duplicates", help="duplicates file (default: <output stem>.duplicates.jsonl)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record (exit 1)")
    p.add_argument("--max_chars", type=int, default=100_000, help="reject longer records; 0: no limit")
    p.add_argument("--dedup", choices=("exact", "near", "none"), default="exact", help="duplicate removal")
    p.add_argument("--near_threshold", type=float, default=0.85, help="Jaccard threshold for --dedup near")
    p.add_argument("--num_perm", type=int, default=128, help="MinHash permutations for --dedup near")
    p.add_argument("--stats", action="store_true", help="write <stem>.stats.json/.stats.md/.stats.png")
    p.add_argument("--tokenizer", help="tokenizer name for token statistics (sft.models.load_tokenizer)")
    p.add_argument("--max_length", type=int, default=2048, help="report the share of records longer than this")
    p.add_argument("--val_ratio", type=float, help="fraction of records for validation, stratified by kind")
    p.add_argument("--val_size", type=int, help="exact number of validation records, stratified by kind")
    p.add_argument("--val_output", help="validation file (default: <output stem>.val.json[l])")
    p.add_argument("--mix", action="append", default=[], metavar="FILE:SHARE",
                   help="blend FILE in as SHARE of the final output, e.g. general.jsonl:0.2 (repeatable)")
    p.add_argument("--limit", type=int, help="read at most this many input records")
    p.add_argument("--seed", type=int, default=42, help="seed for shuffle, split and mixing")
    p.add_argument("--shuffle", action="store_true", help="shuffle the input (exact for plain .jsonl files)")
    p.add_argument("--shuffle_buffer", type=int, default=10_000, help="buffer size when exact shuffle is impossible")
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                   help="processes that parse/normalize JSON-lines inputs (1: all in this process)")
    p.add_argument("--hub_split", default="train", help="split to stream for hub dataset ids")
    p.add_argument("--hub_config", help="config name for hub dataset ids")
    a = p.parse_args(argv)
    return BuildOptions(
        inputs=a.inputs, output=a.output, format=a.format, rejects=a.rejects, duplicates=a.duplicates,
        strict=a.strict, max_chars=a.max_chars or None, dedup=a.dedup, near_threshold=a.near_threshold,
        num_perm=a.num_perm, stats=a.stats, tokenizer=a.tokenizer, max_length=a.max_length,
        val_ratio=a.val_ratio, val_size=a.val_size, val_output=a.val_output, mix=[_mix_spec(m) for m in a.mix],
        limit=a.limit, seed=a.seed, shuffle=a.shuffle, shuffle_buffer=a.shuffle_buffer, workers=a.workers,
        hub_split=a.hub_split, hub_config=a.hub_config)


def _mix_spec(spec: str) -> tuple[str, float]:
    path, sep, share = spec.rpartition(":")
    try:
        if not sep:
            raise ValueError
        return path, float(share)
    except ValueError:
        raise BuildError(f"--mix {spec}: expected FILE:SHARE, e.g. general.jsonl:0.2") from None


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    try:
        opts = parse_args(argv)
    except SystemExit as e:  # argparse already printed usage and the error
        return int(e.code or 0)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if argv is None:  # as a script: `kill` cleans up like Ctrl-C
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        result = build(opts, log=lambda msg: print(msg, file=sys.stderr))
    except StrictError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (BuildError, SourceError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output written (temporary files removed)", file=sys.stderr)
        return 130
    for name, path in result.paths.items():
        print(f"{name}: {path}", file=sys.stderr)
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
