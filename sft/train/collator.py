"""The training collator and what it records: token counts for the throughput logs, sample ids per step.

The stream (sft.tokens.stream) yields whole pre-collated micro-batches, so the DataLoader's batch size is
1 and this collator only unwraps and records (the loss runs in the model's forward: sft.train.loss).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from typing import Callable

import torch
from transformers import TrainerCallback

from sft.tokens.collate import unwrap_collate
from sft.tokens.encoding import IGNORE_INDEX

logger = logging.getLogger(__name__)


class BatchStats:
    """FIFO of per-batch token counts, fed by the collator and drained once per optimizer step.

    The DataLoader runs ahead of the training loop (prefetch), so "the latest batch" is not the
    batch being trained; FIFO order is. Each record is (real, supervised, padded) tokens and samples:
    real = attention_mask.sum() (in packed rows: input_ids.numel() - the collator's padding_tokens),
    supervised = (labels != -100).sum(), padded = input_ids.numel() - real.
    The collator must run in the training process (dataloader_num_workers=0): batches collated in
    worker processes never reach this FIFO, and the callback then leaves the keys out.
    """

    def __init__(self) -> None:
        self._queue: deque[tuple[int, int, int, int]] = deque()
        self._lock = threading.Lock()
        self.paused = False  # set while evaluating: eval batches go through the same collator
        # Seconds the training loop has waited for batches so far (sft.tokens.prefetch.PrefetchStream.waited)
        self.data_wait: Callable[[], float] | None = None

    def record(self, batch: dict, samples: int = 0) -> None:
        if self.paused:
            return
        input_ids = torch.as_tensor(batch["input_ids"])
        mask = batch.get("attention_mask")
        total = input_ids.numel()
        real = int(torch.as_tensor(mask).sum()) if mask is not None else total - batch.get("padding_tokens", 0)
        labels = batch.get("labels")
        supervised = int((torch.as_tensor(labels) != IGNORE_INDEX).sum()) if labels is not None else 0
        with self._lock:
            self._queue.append((real, supervised, total - real, samples))

    def pop(self, n: int) -> dict[str, int] | None:
        """Sums over the next n recorded batches, or None when fewer than n were recorded."""
        with self._lock:
            if len(self._queue) < n:
                self._queue.clear()
                return None
            rows = [self._queue.popleft() for _ in range(n)]
        return {
            "real_tokens": sum(r[0] for r in rows),
            "supervised_tokens": sum(r[1] for r in rows),
            "padded_tokens": sum(r[2] for r in rows),
            "samples": sum(r[3] for r in rows),
        }

    def clear(self) -> None:
        with self._lock:
            self._queue.clear()

    def __len__(self) -> int:
        return len(self._queue)


def training_collator(stats: BatchStats, sample_log: "SampleIdLog"):
    """DataLoader collate_fn: unwrap the stream's batch, record its stats and ids.

    [{"input_ids", "labels", "attention_mask" | "position_ids", "padding_tokens"?, "sample_ids"}]
        -> {"input_ids", "labels", "attention_mask" | "position_ids", ...}
    Evaluation batches (no sample ids) go through the same collator but are not counted.
    """

    def collate(items: list[dict]) -> dict:
        batch = dict(unwrap_collate(items))
        ids = batch.pop("sample_ids", None)
        if ids is not None:
            sample_log.record(ids)
            stats.record(batch, samples=len(ids))
        batch.pop("padding_tokens", None)  # a count for the stats, not a model input
        return batch

    return collate


class SampleIdLog(TrainerCallback):
    """Writes the sample ids used by each optimizer step (for reproducibility checks); path None: off."""

    def __init__(self, path: str | None, accumulation: int):
        self.path, self.accumulation, self.pending = path, accumulation, []

    def record(self, ids: list[str]) -> None:
        if self.path:
            self.pending.append(ids)

    def on_train_begin(self, args, state, control, **kwargs):
        # A new train() call (full_then_lora's phase 2) starts a new DataLoader: ids the previous one
        # had prefetched were never trained, and the restored stream reads those samples again.
        self.pending = []
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.path:
            used, self.pending = self.pending[:self.accumulation], self.pending[self.accumulation:]
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, "ids": [i for ids in used for i in ids]}) + "\n")
        return control


def _sum_over_processes(values: list[float], args) -> list[float]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=args.device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def _max_over_processes(value: float, args) -> float:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=args.device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return float(tensor.item())


class ThroughputCallback(TrainerCallback):
    """Adds tokens_per_second, supervised_tokens, padding_fraction and data_wait_share to each training log.

    Values cover the steps since the previous log, summed over all processes. Step time runs from
    the end of one step to the end of the next, so data loading is included and time spent in
    evaluation or saving is not. Must sit before the logging integrations (see attach_callbacks).

    The end-of-training summary gets the true `train_samples_per_second` and a `train_tokens_per_second`
    (samples and real tokens this train() call trained, over its runtime): the Trainer's own figure
    counts one sample per micro-batch, since the stream hands it whole batches of batch size 1.

    data_wait_share: the part of the step time the training loop spent waiting for the stream's next batch
    (reading and tokenizing not hidden by the prefetch thread), the largest over processes; present when
    the stats carry a `data_wait` clock.
    """

    def __init__(self, stats: BatchStats):
        self.stats = stats
        self._run_samples = self._run_real = 0
        self._micro_batches = 0
        self._missing_warned = False
        self._reset_window()

    def _reset_window(self) -> None:
        self._real = self._supervised = self._padded = 0
        self._seconds = 0.0
        self._complete = True
        self._wait_mark = self._waited()

    def _waited(self) -> float:
        return self.stats.data_wait() if self.stats.data_wait is not None else 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.stats.clear()  # drop batches of an evaluate() run before train()
        self.stats.paused = False
        self._micro_batches = 0
        self._run_samples = self._run_real = 0
        self._reset_window()
        self._mark = time.perf_counter()

    def on_substep_end(self, args, state, control, **kwargs):
        self._micro_batches += 1

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self._seconds += now - self._mark
        self._mark = now
        counts = self.stats.pop(self._micro_batches + 1)
        self._micro_batches = 0
        if counts is None:
            self._complete = False
        else:
            self._real += counts["real_tokens"]
            self._supervised += counts["supervised_tokens"]
            self._padded += counts["padded_tokens"]
            self._run_samples += counts["samples"]
            self._run_real += counts["real_tokens"]
        self._pause_if_evaluating(control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._pause_if_evaluating(control)

    def _pause_if_evaluating(self, control) -> None:
        # The eval DataLoader uses the same collator; its batches must not enter the training FIFO.
        if control.should_evaluate:
            self.stats.paused = True

    def on_evaluate(self, args, state, control, **kwargs):
        self.stats.paused = False
        self._mark = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        self._mark = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "train_runtime" in logs:
            self._true_summary(args, logs)
            return
        if logs is None or "loss" not in logs:
            return  # eval logs
        real, supervised, padded, complete = _sum_over_processes(
            [self._real, self._supervised, self._padded, float(self._complete)], args)
        world = args.world_size if torch.distributed.is_initialized() else 1
        if complete < world:
            if not self._missing_warned:
                logger.warning("token statistics unavailable: the collator's batches were not recorded "
                               "(is dataloader_num_workers > 0 or the collator not wrapped?)")
                self._missing_warned = True
        else:
            logs["tokens_per_second"] = round(real / self._seconds, 1) if self._seconds > 0 else 0.0
            logs["supervised_tokens"] = int(supervised)
            logs["padding_fraction"] = round(padded / (real + padded), 4) if real + padded else 0.0
        if self.stats.data_wait is not None:  # on every process (a collective)
            share = (self._waited() - self._wait_mark) / self._seconds if self._seconds > 0 else 0.0
            logs["data_wait_share"] = round(_max_over_processes(min(share, 1.0), args), 4)
        self._reset_window()

    def _true_summary(self, args, logs: dict) -> None:
        samples, real = _sum_over_processes([float(self._run_samples), float(self._run_real)], args)
        runtime = float(logs["train_runtime"])
        if samples and runtime > 0:  # nothing counted (batches collated elsewhere): leave the Trainer's figures
            logs["train_samples_per_second"] = round(samples / runtime, 3)
            logs["train_tokens_per_second"] = round(real / runtime, 1)
