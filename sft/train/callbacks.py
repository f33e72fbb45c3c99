"""Trainer callbacks for faults and logs, and the run's outcome; the HF Trainer is used as is.

The checkpoint contract (COMPLETE marker, data position, run_end.json) lives in sft.train.checkpoints,
the batch records (token counts, sample ids) in sft.train.collator.

Logs: `<output_dir>/train_log.jsonl` gets one flushed JSON line per log (train and eval) with `step`,
`epoch`, `time`; a non-finite number is written as NaN / Infinity (Python's JSON, which json.loads and
pandas read), so a diverged step shows as what it was, not as 0.0 or a gap. A resumed run first drops the
entries after its checkpoint's step (`drop_log_entries_after`): the steps it trains again are logged once.
`loss_curve.png` is drawn at train end.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import EarlyStoppingCallback, TrainerCallback

from sft.cli import StoppedRun
from sft.files import write_text_atomic
from sft.train.checkpoint_files import weights_problem
from sft.train.checkpoints import CompletionMarkerCallback, Outcome, complete_checkpoints
from sft.train.collator import BatchStats, ThroughputCallback
from sft.train.plots import plot_losses

logger = logging.getLogger(__name__)

TRAIN_LOG_NAME = "train_log.jsonl"
LOSS_CURVE_NAME = "loss_curve.png"


class TrainingStoppedError(StoppedRun):
    """Training stopped on a fault (a non-finite loss); the message says where and how to resume (no traceback)."""


class RunOutcome:
    """How the run ended, shared by its callbacks (and by both phases of full_then_lora).

    FINISHED until a callback reports otherwise; a fault (NONFINITE) overrides an earlier stop, any
    other report keeps the first one.
    """

    def __init__(self) -> None:
        self.outcome = Outcome.FINISHED
        self.message = ""
        self.signum: int | None = None  # SIGNALLED: the signal that stopped the run

    def set(self, outcome: Outcome, message: str, signum: int | None = None) -> None:
        if self.outcome is Outcome.FINISHED or outcome is Outcome.NONFINITE:
            self.outcome, self.message, self.signum = outcome, message, signum


# -------------------------------------------------------------------------------------- logs


def _json_safe(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
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


def drop_log_entries_after(path: str | os.PathLike, step: int) -> int:
    """Keep only the lines of a per-step JSONL log (train_log.jsonl, sample_ids-rank*.jsonl) with `step` <= step;
    returns how many were dropped. Called when resuming from checkpoint-`step`: the killed run logged the steps
    after it, which the resumed run trains (and logs) again. A half line at the end (a kill) goes too."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            logged_step = json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):
            dropped += 1
            continue
        if isinstance(logged_step, int) and logged_step > step:
            dropped += 1
        else:
            kept.append(line + "\n")
    if dropped:
        write_text_atomic(path, "".join(kept))
        logger.info("%s: dropped %d entries after step %d (the resumed run trains those steps again)",
                    path, dropped, step)
    return dropped


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


def _max_abs_weight(model) -> float | None:
    """max |w| over the model's parameters (this process's shards), or None when they cannot be read."""
    try:
        with torch.no_grad():
            values = [p.detach().abs().max().float() for p in model.parameters() if p.numel() > 0 and not p.is_meta]
            return float(torch.stack([v.cpu() for v in values]).max()) if values else None
    except (RuntimeError, TypeError, NotImplementedError):  # exotic parameter types (DTensor on old torch)
        return None


def last_sane_checkpoint(output_dir: str | os.PathLike, reference: float | None) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint whose weights pass weights_problem, and why each newer one did not."""
    skipped = []
    for _, path in reversed(complete_checkpoints(output_dir)):
        try:
            problem = weights_problem(path, reference)
        except (OSError, ValueError, RuntimeError) as err:  # damaged or being rotated away
            problem = f"its weights cannot be read ({err})"
        if problem is None:
            return path, skipped
        skipped.append(f"{path.name}: {problem}")
    return None, skipped


class NonFiniteLossCallback(TrainerCallback):
    """Stops on a NaN/inf gradient before the optimizer applies it; no save happens afterwards.

    A non-finite loss makes every gradient non-finite, so checking gradients catches both. The
    check runs in on_pre_optimizer_step (after clipping, before optimizer.step()); dropping all
    gradients (p.grad = None) makes the optimizer skip every parameter, so the weights stay those
    of the previous step. The bad step is logged (its loss as NaN: the run's TrainingArguments turn off
    logging_nan_inf_filter, which would log 0.0). The run's outcome becomes NONFINITE; its message names
    the newest checkpoint whose weights are finite and sane (last_sane_checkpoint: the newest one may
    already hold diverged weights) and the exact flag to resume from it.
    (DeepSpeed keeps gradients outside p.grad; this check does not see them.)
    """

    def __init__(self, outcome: "RunOutcome") -> None:
        self.outcome = outcome
        self.bad_step: int | None = None
        self.kind: str | None = None
        self.reference: float | None = None  # max |w| at train begin

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and state.is_world_process_zero:
            self.reference = _max_abs_weight(model)

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
        self.outcome.set(Outcome.NONFINITE, f"loss became {self.kind} at step {self.bad_step}; "
                         + self._where_to_resume(args, state))
        self._stop(control)

    def _where_to_resume(self, args, state) -> str:
        advice = "after lowering the learning rate / checking the data"
        if not state.is_world_process_zero:
            return f"the main process names the checkpoint to resume from ({advice})"
        good, skipped = last_sane_checkpoint(args.output_dir, self.reference)
        passed = f" (passed over: {'; '.join(skipped)})" if skipped else ""
        if good is None:
            return (f"no checkpoint with sane weights was saved before it in {args.output_dir}{passed}; start again "
                    f"{advice}")
        return (f"the last checkpoint with finite, sane weights is {good}{passed}; resume with "
                f"--resume_from_checkpoint {good} {advice}")

    def _stop(self, control) -> None:
        control.should_training_stop = True
        control.should_save = False
        control.should_evaluate = False

    def on_step_end(self, args, state, control, **kwargs):
        if self.bad_step is not None:
            self._stop(control)  # overrides DefaultFlowCallback's save at save_steps / max_steps
            control.should_log = True  # the bad step's loss is logged (NaN), whatever logging_steps says

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.bad_step is not None:
            self._stop(control)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.bad_step is not None:
            self._stop(control)


class StopSignalled(KeyboardInterrupt):
    """SIGTERM/SIGINT while the data stream was reading (or outside the training loop: start-up, final
    save): the run stops at once, without a new checkpoint.
    A KeyboardInterrupt, so no `except Exception` on the way (record readers) swallows it."""

    def __init__(self, signum: int, where: str = "while reading training data") -> None:
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + int(signum)
        super().__init__(f"stopped by {self.signal_name} {where}")


class GracefulStopCallback(TrainerCallback):
    """SIGTERM/SIGINT: finish the current step (or evaluation), save a checkpoint, stop cleanly.

    The handler only sets a flag and puts the previous handler back, so a second Ctrl-C raises
    KeyboardInterrupt at once (and a second SIGTERM kills) as usual. Handlers exist from train begin
    to train end; they need the main thread (elsewhere the callback only logs a warning). With a
    scheduler that kills after a grace period (Slurm, Kubernetes), the period must cover one step
    plus one checkpoint save. The run's outcome becomes SIGNALLED.
    """

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self, outcome: "RunOutcome", reading: Callable[[], bool] | None = None) -> None:
        self.outcome = outcome
        # True while the data stream reads between steps: a step boundary may be far away (a long run
        # of rejected records), so a signal then stops at once (the last checkpoint is the consistent one).
        self.reading = reading or (lambda: False)
        self.signal_name: str | None = None
        self.stopped_step: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        signal.signal(signum, self._previous.pop(signum, signal.SIG_DFL))
        if self.reading():
            raise StopSignalled(signum)
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
        signum = getattr(signal, self.signal_name, signal.SIGTERM)  # another process's signal: SIGTERM
        self.outcome.set(Outcome.SIGNALLED, f"stopped by {self.signal_name} at step {self.stopped_step}, "
                         f"checkpoint-{self.stopped_step} saved; resume with --resume_from_checkpoint auto",
                         signum=int(signum))
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
        self.restore_handlers()

    def restore_handlers(self) -> None:
        """Put back the handlers found at train begin. on_train_end does it, but a Trainer stopped by an
        exception never calls it: whoever runs train() calls this in a `finally` (see restore_stop_handlers)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


def restore_stop_handlers(trainer) -> None:
    """The signal handlers GracefulStopCallback installed on `trainer` go back, however train() ended."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, GracefulStopCallback):
            callback.restore_handlers()


class EarlyStopOutcome(TrainerCallback):
    """Reports transformers' EarlyStoppingCallback's stop as the EARLY_STOPPED outcome (it sits right after it).

    The Trainer updates state.best_metric after the evaluation's callbacks ran, so here it is still
    the best value before this evaluation.
    """

    def __init__(self, early: EarlyStoppingCallback, outcome: RunOutcome):
        self.early, self.outcome = early, outcome

    def on_evaluate(self, args, state, control, **kwargs):
        if self.early.early_stopping_patience_counter >= self.early.early_stopping_patience:
            message = (f"early stopping at step {state.global_step}: {args.metric_for_best_model} did not improve "
                       f"on {state.best_metric:.4f} for {self.early.early_stopping_patience} evaluations")
            logger.warning(message)
            self.outcome.set(Outcome.EARLY_STOPPED, message)


# ----------------------------------------------------------------------------------- wiring


def attach_callbacks(trainer, stats: BatchStats, outcome: RunOutcome, data_state_fn: Callable[[int], Any] | None = None,
                     early_stopping_patience: int = 0, tensorboard: bool = True,
                     save_total_limit: int | None | str = "from args",
                     reading: Callable[[], bool] | None = None) -> None:
    """Add this module's callbacks to `trainer`, in the order they need.

    ThroughputCallback goes right after DefaultFlowCallback: it must see the flow's should_evaluate,
    and its keys must be in the logs dict before TensorBoard, train_log.jsonl and the progress bar
    read it. NonFiniteLossCallback goes last so its "no save" wins over every other callback.
    Early stopping needs the args of checkpoint_args_overrides(has_eval=True) (metric_for_best_model).
    Rotation moves from the Trainer to CompletionMarkerCallback (after COMPLETE): save_total_limit is taken
    from trainer.args unless given (callers whose args object is shared between trainers pass it), and the
    Trainer's own is set to None.
    """
    from transformers.integrations import TensorBoardCallback
    from transformers.trainer_callback import DefaultFlowCallback

    output_dir = trainer.args.output_dir
    handler = trainer.callback_handler.callbacks
    flow_index = next((i for i, cb in enumerate(handler) if isinstance(cb, DefaultFlowCallback)), -1)
    handler.insert(flow_index + 1, ThroughputCallback(stats))
    if tensorboard and not any(isinstance(cb, TensorBoardCallback) for cb in handler):
        trainer.add_callback(TensorBoardCallback())
    callbacks: list[TrainerCallback] = [JsonlLogCallback(output_dir), LossPlotCallback(output_dir)]
    if early_stopping_patience:
        early = EarlyStoppingCallback(early_stopping_patience)
        callbacks += [early, EarlyStopOutcome(early, outcome)]
    if save_total_limit == "from args":
        save_total_limit = trainer.args.save_total_limit
    trainer.args.save_total_limit = None  # the Trainer would rotate before the new checkpoint is COMPLETE
    callbacks += [GracefulStopCallback(outcome, reading), CompletionMarkerCallback(data_state_fn, save_total_limit),
                  NonFiniteLossCallback(outcome)]
    for callback in callbacks:
        trainer.add_callback(callback)
