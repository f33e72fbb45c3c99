"""What the data builder shows while it reads: a tqdm bar on a terminal, a plain line now and then in a log.

    terminal:  1,200,000rec [00:41, 29102.55rec/s, rejected=1,204, duplicates=88,310]
    log file:  progress: 600,000 records read in 0:00:30 (20,000/s), 602 rejected, 44,155 duplicates

A build over a million rows otherwise prints nothing until it ends. The bar is tqdm's (rate and elapsed
time included); redirected output (a CI log, `nohup`) gets no carriage-return redraws, only a line every
`interval` seconds, since a bar there would write thousands of partial lines.
"""
from __future__ import annotations

import time
from datetime import timedelta
from typing import Callable, TextIO

# How often the bar's numbers are pushed to tqdm: counting per record is cheap, a tqdm refresh is not.
BAR_TICK_SECONDS = 0.25


class BuildProgress:
    """Counts read / rejected / duplicate records; `update()` is called once per record read."""

    def __init__(self, stream: TextIO, interval: float = 30.0, clock: Callable[[], float] | None = None,
                 bar: bool | None = None):
        self.stream, self.interval, self.clock = stream, interval, clock or time.monotonic
        self.read = self.rejected = self.duplicates = 0
        self.start = self.last = self.clock()
        self.shown = 0  # records already pushed to the bar
        if bar is None:
            bar = _is_terminal(stream)
        self.bar = None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(file=stream, unit="rec", unit_scale=False, dynamic_ncols=True, mininterval=BAR_TICK_SECONDS,
                            desc="reading")

    def update(self, read: int, rejected: int, duplicates: int) -> None:
        """The builder's running totals (records read so far, of which rejected, of which duplicates)."""
        self.read, self.rejected, self.duplicates = read, rejected, duplicates
        now = self.clock()
        if now - self.last < (BAR_TICK_SECONDS if self.bar is not None else self.interval):
            return
        self.last = now
        if self.bar is not None:
            self._push_bar()
        else:
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float | None = None) -> str:
        elapsed = max((self.clock() if now is None else now) - self.start, 0.0)
        rate = self.read / elapsed if elapsed > 0 else 0.0
        shown = timedelta(seconds=round(elapsed))
        return (f"progress: {self.read:,} records read in {shown} ({rate:,.0f}/s), {self.rejected:,} rejected, "
                f"{self.duplicates:,} duplicates")

    def close(self) -> None:
        """Final numbers on the bar (then closed); a log gets no extra line: the summary follows."""
        if self.bar is not None:
            self._push_bar()
            self.bar.close()
            self.bar = None

    def _push_bar(self) -> None:
        self.bar.set_postfix_str(f"rejected={self.rejected:,}, duplicates={self.duplicates:,}", refresh=False)
        self.bar.update(self.read - self.shown)
        self.shown = self.read


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
