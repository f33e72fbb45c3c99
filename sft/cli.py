"""Entry-point plumbing shared by the three top-level scripts: user errors become one clear line."""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from sft.config import ConfigError
from sft.models import ModelLoadError

USER_ERRORS = (ConfigError, ModelLoadError, FileNotFoundError, ValueError)


class StoppedRun(RuntimeError):
    """A run that stopped on a condition its message fully explains (where, and what to do next), e.g. a
    diverged loss: printed as one line, exit status 1 (not a user mistake, not a crash either)."""


def run_entry(main: Callable[[list[str]], int], argv: list[str] | None, prog: str) -> int:
    """Run `main(argv)`; a user mistake prints `prog: error: ...` and returns 2 instead of a traceback.

    Set SFT_DEBUG=1 to see the full traceback.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return main(argv)
    except StoppedRun as err:
        if os.environ.get("SFT_DEBUG"):
            raise
        print(f"{prog}: stopped: {err}", file=sys.stderr)
        return 1
    except USER_ERRORS as err:
        if os.environ.get("SFT_DEBUG"):
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        # a stop signal handled by the program carries its exit code (128 + signal) and says how to go on
        print(f"{prog}: {err or 'interrupted'}", file=sys.stderr)
        return getattr(err, "exit_code", 130)
