"""The loss-curve PNG: train and validation loss against the optimizer step, from train_log.jsonl.

Usable standalone on a finished or running job:

    python -c "from sft.train.plots import plot_losses; plot_losses('outputs/run/train_log.jsonl', 'loss.png')"
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from sft.files import atomic_path


def read_train_log(path: str | os.PathLike) -> list[dict]:
    """Parse train_log.jsonl (one JSON object per line).

    A run that is still writing may leave a half line at the end; it is skipped rather than
    treated as corruption. A bad line anywhere else is an error naming the line.
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON line ({err}); the log is damaged") from err
    return records


def loss_series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one logged key. A resumed run logs some steps twice: the later value wins."""
    by_step: dict[int, float] = {}
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and "step" in record:
            by_step[int(record["step"])] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_losses(train_log_path: str | os.PathLike, png_path: str | os.PathLike) -> Path:
    """Draw train `loss` and validation `eval_loss` vs step into `png_path` (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    records = read_train_log(train_log_path)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    drawn = 0
    for key, label, style in (("loss", "train", "-"), ("eval_loss", "validation", "o-")):
        steps, values = loss_series(records, key)
        if steps:
            ax.plot(steps, values, style, label=label, markersize=4)
            drawn += 1
    if drawn:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no loss logged yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(f"{Path(train_log_path).parent.name}: loss")
    ax.grid(alpha=0.3)
    return save_figure(fig, png_path)


def save_figure(fig, png_path: str | os.PathLike) -> Path:
    """Lay out, write atomically (a viewer never opens a half-written image) and close a figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    target = Path(png_path)
    try:
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return target
