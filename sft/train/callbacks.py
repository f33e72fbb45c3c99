"""Trainer callbacks for faults, logs and what users see; the HF Trainer is used as is.

The checkpoint contract (COMPLETE marker, data position, run_end.json) lives in sft.train.checkpoints.

Logs: `<output_dir>/train_log.jsonl` gets one flushed JSON line per log (train and eval) with `step`,
`epoch`, `time`; non-finite numbers are written as null. `loss_curve.png` is drawn at train end.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import TrainerCallback

from sft.tokens.encoding import IGNORE_INDEX
from sft.train.checkpoints import CompletionMarkerCallback, latest_complete_checkpoint
from sft.train.plots import plot_losses

logger = logging.getLogger(__name__)

TRAIN_LOG_NAME = "train_log.jsonl"
LOSS_CURVE_NAME = "loss_curve.png"


class TrainingStoppedError(RuntimeError):
    """Training stopped on a fault (a non-finite loss); the message says where and how to resume."""


# ------------------------------------------------------------------------------ batch statistics


class BatchStats:
    """FIFO of per-batch token counts, fed by the collator and drained once per optimizer step.

    The DataLoader runs ahead of the training loop (prefetch), so "the latest batch" is not the
    batch being trained; FIFO order is. Each record is (real, supervised, padded) tokens:
    real = attention_mask.sum() (in packed rows: input_ids.numel() - the collator's padding_tokens),
    supervised = (labels != -100).sum(), padded = input_ids.numel() - real.
    The collator must run in the training process (dataloader_num_workers=0): batches collated in
    worker processes never reach this FIFO, and the callback then leaves the keys out.
    """

    def __init__(self) -> None:
        self._queue: deque[tuple[int, int, int]] = deque()
        self._lock = threading.Lock()
        self.paused = False  # set while evaluating: eval batches go through the same collator

    def record(self, batch: dict) -> None:
        if self.paused:
            return
        input_ids = torch.as_tensor(batch["input_ids"])
        mask = batch.get("attention_mask")
        total = input_ids.numel()
        real = int(torch.as_tensor(mask).sum()) if mask is not None else total - batch.get("padding_tokens", 0)
        labels = batch.get("labels")
        supervised = int((torch.as_tensor(labels) != IGNORE_INDEX).sum()) if labels is not None else 0
        with self._lock:
            self._queue.append((real, supervised, total - real))

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
        }

    def clear(self) -> None:
        with self._lock:
            self._queue.clear()

    def __len__(self) -> int:
        return len(self._queue)


def recording_collator(collate: Callable[[list], dict], stats: BatchStats) -> Callable[[list], dict]:
    """Wrap a collator so every batch it builds is counted in `stats` (the batch is unchanged)."""

    def collate_and_record(features: list) -> dict:
        batch = collate(features)
        stats.record(batch)
        return batch

    return collate_and_record


def _sum_over_processes(values: list[float], args) -> list[float]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=args.device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


class ThroughputCallback(TrainerCallback):
    """Adds tokens_per_second, supervised_tokens and padding_fraction to each training log.

    Values cover the steps since the previous log, summed over all processes. Step time runs from
    the end of one step to the end of the next, so data loading is included and time spent in
    evaluation or saving is not. Must sit before the logging integrations (see attach_callbacks).
    """

    def __init__(self, stats: BatchStats):
        self.stats = stats
        self._micro_batches = 0
        self._missing_warned = False
        self._reset_window()

    def _reset_window(self) -> None:
        self._real = self._supervised = self._padded = 0
        self._seconds = 0.0
        self._complete = True

    def on_train_begin(self, args, state, control, **kwargs):
        self.stats.clear()  # drop batches of an evaluate() run before train()
        self.stats.paused = False
        self._micro_batches = 0
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
        if logs is None or "loss" not in logs:
            return  # eval and end-of-training summaries
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
        self._reset_window()


# -------------------------------------------------------------------------------------- logs


def _json_safe(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN/Infinity
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class JsonlLogCallback(TrainerCallback):
    """Appends every log (train and eval) to <output_dir>/train_log.jsonl, one flushed line each."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / TRAIN_LOG_NAME
        self._file = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or logs is None:
            return
        if self._file is None:  # a log outside train(), e.g. a final trainer.evaluate()
            self.on_train_begin(args, state, control)
        record = {"step": state.global_step, "epoch": state.epoch, "time": round(time.time(), 3)}
        record.update({k: _json_safe(v) for k, v in logs.items()})
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()  # a side process follows the file live

    def on_train_end(self, args, state, control, **kwargs):
        if self._file is not None:
            self._file.close()
            self._file = None


class LossPlotCallback(TrainerCallback):
    """Draws <output_dir>/loss_curve.png from train_log.jsonl when training ends."""

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)

    def on_train_end(self, args, state, control, **kwargs):
        log_path = self.output_dir / TRAIN_LOG_NAME
        if not state.is_world_process_zero or not log_path.is_file():
            return
        try:
            plot_losses(log_path, self.output_dir / LOSS_CURVE_NAME)
        except Exception as err:  # a plotting problem must not fail a finished training run
            logger.warning("could not draw %s: %s", self.output_dir / LOSS_CURVE_NAME, err)


# ------------------------------------------------------------------------------------ faults


def _any_process(flag: bool, args) -> bool:
    """True when `flag` is set on any process, so every rank takes the same branch (no deadlock)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=args.device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return bool(tensor.item())


class NonFiniteLossCallback(TrainerCallback):
    """Stops on a NaN/inf gradient before the optimizer applies it; no save happens afterwards.

    A non-finite loss makes every gradient non-finite, so checking gradients catches both. The
    check runs in on_pre_optimizer_step (after clipping, before optimizer.step()); dropping all
    gradients (p.grad = None) makes the optimizer skip every parameter, so the weights stay those
    of the previous step. train.py then calls raise_if_nonfinite. (DeepSpeed keeps gradients
    outside p.grad; this check does not see them.)
    """

    def __init__(self) -> None:
        self.bad_step: int | None = None
        self.kind: str | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("NonFiniteLossCallback needs the model in on_pre_optimizer_step (transformers >= 5)")
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        kind = None
        if grads:
            # 2-norms accumulated in fp32 (an fp16 norm overflows by itself); one device sync per step.
            # (Max-abs norms would avoid overflow too but are ~25x slower on CPU.)
            norms = torch.stack([n.to(grads[0].device) for n in torch._foreach_norm(grads, 2, dtype=torch.float32)])
            if not torch.isfinite(norms).all():
                kind = "nan" if torch.isnan(norms).any() else "inf"
        if not _any_process(kind is not None, args):
            return
        self.bad_step = state.global_step + 1  # global_step counts finished steps
        self.kind = kind or "nan/inf (on another process)"
        for p in model.parameters():
            p.grad = None
        logger.error("loss became %s at step %d: gradients dropped, stopping without saving", self.kind, self.bad_step)
        self._stop(control)

    def _stop(self, control) -> None:
        control.should_training_stop = True
        control.should_save = False
        control.should_evaluate = False

    def on_step_end(self, args, state, control, **kwargs):
        if self.bad_step is not None:
            self._stop(control)  # overrides DefaultFlowCallback's save at save_steps / max_steps

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.bad_step is not None:
            self._stop(control)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.bad_step is not None:
            self._stop(control)


def nonfinite_message(callback: NonFiniteLossCallback, output_dir: str | os.PathLike) -> str | None:
    if callback.bad_step is None:
        return None
    good = latest_complete_checkpoint(output_dir)
    where = (f"the last good checkpoint is {Path(good).name} in {output_dir}" if good
             else f"no checkpoint was saved before it in {output_dir}")
    return (f"loss became {callback.kind} at step {callback.bad_step}; {where} (resume with "
            f"--resume_from_checkpoint auto after lowering the learning rate / checking the data)")


def raise_if_nonfinite(callback: NonFiniteLossCallback, output_dir: str | os.PathLike) -> None:
    """Call after trainer.train() and before saving the final model."""
    message = nonfinite_message(callback, output_dir)
    if message:
        raise TrainingStoppedError(message)


class GracefulStopCallback(TrainerCallback):
    """SIGTERM/SIGINT: finish the current step (or evaluation), save a checkpoint, stop cleanly.

    The handler only sets a flag and puts the previous handler back, so a second Ctrl-C raises
    KeyboardInterrupt at once (and a second SIGTERM kills) as usual. Handlers exist from train begin
    to train end; they need the main thread (elsewhere the callback only logs a warning). With a
    scheduler that kills after a grace period (Slurm, Kubernetes), the period must cover one step
    plus one checkpoint save.
    """

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.stopped_step: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        signal.signal(signum, self._previous.pop(signum, signal.SIG_DFL))
        logger.warning("received %s: saving a checkpoint after this step, then stopping "
                       "(send it again to stop at once)", self.signal_name)

    def on_train_begin(self, args, state, control, **kwargs):
        self.signal_name = self.stopped_step = None
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not in the main thread: SIGTERM/SIGINT will not save a checkpoint before exit")
            return
        for name in self.SIGNALS:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._handle)

    def _signalled(self, args, state) -> bool:
        if self.stopped_step is not None or not _any_process(self.signal_name is not None, args):
            return False
        self.signal_name = self.signal_name or "a signal (on another process)"
        self.stopped_step = state.global_step
        return True

    def on_step_end(self, args, state, control, **kwargs):
        if self._signalled(args, state):
            control.should_save = True
            control.should_training_stop = True

    def on_evaluate(self, args, state, control, **kwargs):
        # A signal during a long evaluation: the save that follows it in the same step is the last one.
        if self._signalled(args, state):
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        # A signal during a save: this checkpoint is the one to resume from; stop without another step.
        if self._signalled(args, state):
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


class EarlyStopping(TrainerCallback):
    """Stop when eval_loss has not improved by more than `threshold` for `patience` evaluations.

    Own small callback rather than transformers.EarlyStoppingCallback: that one asserts
    metric_for_best_model at train begin and reads state.best_metric, so it breaks when a run
    has no metric set; this one only needs eval_loss in the metrics.
    """

    def __init__(self, patience: int, threshold: float = 0.0):
        if patience < 1:
            raise ValueError(f"early stopping patience {patience}: must be >= 1 (0 disables it: do not add the callback)")
        self.patience = patience
        self.threshold = threshold
        self.best: float | None = None
        self.bad_evals = 0
        self.stopped_step: int | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get("eval_loss")
        if value is None or not math.isfinite(value):
            return
        if self.best is None or value < self.best - self.threshold:
            self.best, self.bad_evals = value, 0
            return
        self.bad_evals += 1
        if self.bad_evals >= self.patience:
            control.should_training_stop = True
            self.stopped_step = state.global_step
            logger.warning("early stopping at step %d: eval_loss %.4f has not improved on %.4f for %d evaluations",
                           state.global_step, value, self.best, self.bad_evals)


# ----------------------------------------------------------------------------------- wiring


@dataclass
class RunCallbacks:
    """The callbacks of one run, kept so train.py can ask afterwards why training stopped."""

    stats: BatchStats
    throughput: ThroughputCallback
    jsonl: JsonlLogCallback
    plot: LossPlotCallback
    marker: CompletionMarkerCallback
    nonfinite: NonFiniteLossCallback
    graceful: GracefulStopCallback
    early: EarlyStopping | None = None


def attach_callbacks(trainer, stats: BatchStats, data_state_fn: Callable[[int], Any] | None = None,
                     early_stopping_patience: int = 0, early_stopping_threshold: float = 0.0,
                     tensorboard: bool = True) -> RunCallbacks:
    """Add this module's callbacks to `trainer`, in the order they need.

    ThroughputCallback goes right after DefaultFlowCallback: it must see the flow's should_evaluate,
    and its keys must be in the logs dict before TensorBoard, train_log.jsonl and the progress bar
    read it. NonFiniteLossCallback goes last so its "no save" wins over every other callback.
    """
    from transformers.integrations import TensorBoardCallback
    from transformers.trainer_callback import DefaultFlowCallback

    output_dir = trainer.args.output_dir
    run = RunCallbacks(
        stats=stats, throughput=ThroughputCallback(stats), jsonl=JsonlLogCallback(output_dir),
        plot=LossPlotCallback(output_dir), marker=CompletionMarkerCallback(data_state_fn),
        nonfinite=NonFiniteLossCallback(), graceful=GracefulStopCallback(),
        early=EarlyStopping(early_stopping_patience, early_stopping_threshold) if early_stopping_patience else None,
    )
    handler = trainer.callback_handler.callbacks
    flow_index = next((i for i, cb in enumerate(handler) if isinstance(cb, DefaultFlowCallback)), -1)
    handler.insert(flow_index + 1, run.throughput)
    if tensorboard and not any(isinstance(cb, TensorBoardCallback) for cb in handler):
        trainer.add_callback(TensorBoardCallback())
    for callback in (run.jsonl, run.plot, run.early, run.graceful, run.marker, run.nonfinite):
        if callback is not None:
            trainer.add_callback(callback)
    return run


def stop_message(run: RunCallbacks) -> str | None:
    """Why a run ended before max_steps without a fault, for train.py to print; None otherwise."""
    if run.graceful.stopped_step is not None:
        step = run.graceful.stopped_step
        return (f"stopped by {run.graceful.signal_name} at step {step}, checkpoint-{step} saved; "
                f"resume with --resume_from_checkpoint auto")
    if run.early is not None and run.early.stopped_step is not None:
        return (f"early stopping at step {run.early.stopped_step}: eval_loss did not improve on "
                f"{run.early.best:.4f} for {run.early.patience} evaluations")
    return None


# ------------------------------------------------------------------------------------ banner


