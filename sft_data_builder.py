"""Build a checked, deduplicated ShareGPT dataset from raw files (Firefly, ShareGPT, OpenAI, Alpaca, ...).

    python sft_data_builder.py firefly-train-1.1M.jsonl --output data/firefly.jsonl --stats --val_ratio 0.01

Exit status: 0 done, 1 --strict found a bad record, 2 user error (bad flag, missing file, offline hub),
130 interrupted. See docs/data_builder.md.
"""
from __future__ import annotations

import signal
import sys

from sft.config import ConfigError, parse_args
from sft.data.builder import BuildError, BuildOptions, StrictError, build
from sft.data.progress import BuildProgress
from sft.data.sources import SourceError


def parse_options(argv: list[str]) -> BuildOptions:
    """`IN [IN ...] --output X [flags]` (or `--config build.yaml`) -> BuildOptions; ConfigError lists every problem."""
    (options,) = parse_args((BuildOptions,), argv, prog="sft_data_builder.py", description=__doc__.split("\n")[0],
                            positional="inputs")
    return options


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    try:
        opts = parse_options(sys.argv[1:] if argv is None else [str(a) for a in argv])
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except ConfigError as e:
        print(f"sft_data_builder.py: error: {e}", file=sys.stderr)
        return 2
    if argv is None:  # as a script: `kill` cleans up like Ctrl-C
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        progress = BuildProgress(sys.stderr, opts.progress_interval) if opts.progress_interval > 0 else None
        result = build(opts, log=lambda msg: print(msg, file=sys.stderr), progress=progress)
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
