"""full_then_lora: full fine-tuning for the first `full_ratio` of steps, then LoRA on the updated weights.

One run, one schedule, one checkpoint sequence in output_dir:

    checkpoint-k   (k < X)  phase 1: full weights + optimizer/scheduler, as any full run
    full_phase/             the full weights at the switch step X (+ tokenizer, switch.json):
                            the base model of every phase-2 adapter; kept by checkpoint rotation
    checkpoint-X            phase-2 start: the fresh adapter, an empty LoRA optimizer state, the
                            scheduler advanced to X and the trainer state (global_step X, phase-1 logs)
    checkpoint-k   (k > X)  phase 2: adapter + optimizer/scheduler, base = full_phase/

Phase 2 always starts by resuming the HF Trainer from checkpoint-X, whether the run just switched
or was restarted: so the learning-rate schedule, global step, log history and data position
continue exactly where one uninterrupted run would be, and an interrupted run resumes the same way.
"""
from __future__ import annotations

import copy
import json
import logging
import random
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from transformers import TrainerCallback, TrainerState
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from sft.files import atomic_path
from sft.models import load_model
from sft.train.export import is_adapter_dir
from sft.train.methods import apply_lora, gathered_state_dict, log_trainable_parameters

logger = logging.getLogger(__name__)

FULL_PHASE_DIR = "full_phase"
SWITCH_FILE = "switch.json"


class SwitchAtStep(TrainerCallback):
    """Stops phase 1 at the switch step X = round(full_ratio * max_steps), without saving there.

    X is computed at train begin, when the Trainer knows max_steps (also for epoch-based runs).
    Phase 1 must not write checkpoint-X itself: that name belongs to the phase-2 start checkpoint.
    """

    def __init__(self, full_ratio: float):
        self.full_ratio = full_ratio
        self.switch_step: int | None = None
        # Set when an earlier callback asked to stop at step X itself: a graceful stop (with a save)
        # still switches but does not start LoRA; a fault (stop without save) does not switch.
        self.stop_requested = False
        self.save_requested = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.switch_step = switch_step(self.full_ratio, state.max_steps)
        if state.global_step >= self.switch_step:
            raise ValueError(
                f"full_then_lora: the resumed phase-1 checkpoint is at step {state.global_step}, at or past the "
                f"switch step {self.switch_step} (= round(full_ratio {self.full_ratio} x max_steps "
                f"{state.max_steps})). It was written with another --full_ratio or --max_steps: use the same values."
            )

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.switch_step:
            self.stop_requested, self.save_requested = control.should_training_stop, control.should_save
            control.should_training_stop = True
            control.should_save = False
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.switch_step is not None and state.global_step >= self.switch_step:
            control.should_save = False
        return control


def switch_step(full_ratio: float, max_steps: int) -> int:
    """The last full fine-tuning step; LoRA trains steps switch_step+1 .. max_steps.

    The range of full_ratio itself is checked with the other flags (MethodArguments.problems); this
    check needs max_steps, which is known only when training starts.
    """
    step = round(full_ratio * max_steps)
    if not 1 <= step < max_steps:
        raise ValueError(
            f"full_then_lora: --full_ratio {full_ratio} of {max_steps} steps leaves "
            f"{step} full step(s) and {max_steps - step} LoRA step(s); both phases need at least one. "
            "Raise --max_steps or change --full_ratio."
        )
    return step


def run_full_then_lora(
    make_trainer: Callable[[Any, Any], Any],
    model,
    tokenizer,
    method_args,
    training_args,
    resume_from_checkpoint: str | None = None,
    finish_checkpoint: Callable[[Path, int], None] | None = None,
    before_lora_phase: Callable[[str], None] | None = None,
    load_finished: Callable[[Any, str], Any] | None = None,
):
    """Train `model` (prepared as full fine-tuning) with the hybrid method; return the LoRA PeftModel.

    make_trainer(model, training_args) -> transformers.Trainer builds the Trainer (datasets, collator,
    loss, callbacks); it is called once per phase. resume_from_checkpoint: a checkpoint folder
    (sft.train.checkpoints.resolve_resume) or None. finish_checkpoint(checkpoint_X_dir, X) completes
    the phase-2 start checkpoint as the run's on_save callbacks complete every other one (data
    position, COMPLETE marker); it runs on every process. before_lora_phase(checkpoint_X_dir) runs after
    the switch, before LoRA trains: a stateful data stream restores its position there (map-style
    datasets need nothing: the Trainer skips the consumed batches itself). When resuming from a LoRA
    checkpoint it is not called: restore the stream from that checkpoint as for any resume.
    load_finished(trainer, checkpoint) -> model: given when resume_from_checkpoint is already at max_steps (a run
    killed after its last save): the LoRA checkpoint is loaded through it instead of trained, which would take
    the Trainer one step past max_steps. Such a checkpoint is always a LoRA one (full_ratio < 1).

    Returns the PeftModel (adapter base = output_dir/full_phase), or the full model if phase 1 was
    stopped early (signal, early stopping, non-finite loss): then no switch happens.
    """
    output_dir = Path(training_args.output_dir)
    checkpoint = Path(resume_from_checkpoint) if resume_from_checkpoint else None
    if checkpoint is not None and is_adapter_dir(checkpoint):
        logger.info("full_then_lora: resuming phase 2 (LoRA) from %s", checkpoint)
        lora_model = apply_lora(_load_switch_weights(output_dir, model), method_args, training_args)
        trainer = make_trainer(lora_model, training_args)
        if load_finished is not None:
            return load_finished(trainer, str(checkpoint))
        return _train_lora_phase(trainer, checkpoint)

    model.requires_grad_(True)
    phase1 = make_trainer(model, training_args)
    switch = SwitchAtStep(method_args.full_ratio)
    phase1.add_callback(switch)
    print(f"[full_then_lora] phase 1: full fine-tuning (ratio {method_args.full_ratio})", flush=True)
    phase1.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    faulted = switch.stop_requested and not switch.save_requested
    if phase1.state.global_step < switch.switch_step or faulted:
        logger.warning("full_then_lora: phase 1 stopped at step %d, before switching to LoRA at step %d "
                       "(resume to continue)", phase1.state.global_step, switch.switch_step)
        return phase1.model
    # The full model's optimizer state (2x the weights for AdamW) is not needed any more.
    phase1.optimizer = phase1.lr_scheduler = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    model = phase1.accelerator.unwrap_model(phase1.model)
    # Every rank joins the gather of a sharded model; rank 0 writes it.
    state_dict = gathered_state_dict(phase1)
    if training_args.should_save:
        _save_switch_weights(model, state_dict, tokenizer, output_dir, switch.switch_step, phase1.state.max_steps,
                             method_args)
    del state_dict
    _barrier()
    # A sharded phase-1 model (FSDP/ZeRO-3) cannot take adapters in place: every rank reloads the switch weights.
    sharded = phase1.is_fsdp_enabled or phase1.is_deepspeed_enabled
    lora_model = apply_lora(_load_switch_weights(output_dir, model, reload=sharded), method_args, training_args)
    phase2 = make_trainer(lora_model, training_args)
    start = output_dir / f"{PREFIX_CHECKPOINT_DIR}-{switch.switch_step}"
    _write_phase2_start(phase2, lora_model, tokenizer, phase1.state, start, training_args)
    if finish_checkpoint is not None:
        finish_checkpoint(start, switch.switch_step)
    del phase1
    if switch.stop_requested:  # e.g. SIGTERM at step X: checkpoint-X is the LoRA start; resume from it
        logger.warning("full_then_lora: stop requested at the switch step %d; resume from %s",
                       switch.switch_step, start)
        return lora_model
    if before_lora_phase is not None:
        before_lora_phase(str(start))
    return _train_lora_phase(phase2, start)


def _save_switch_weights(model, state_dict, tokenizer, output_dir: Path, step: int, max_steps: int,
                         method_args) -> Path:
    """Write full_phase/ atomically: a half-written base would poison every later adapter.

    state_dict: the gathered full weights (methods.gathered_state_dict), never the sharded parameters.
    """
    target = output_dir / FULL_PHASE_DIR
    with atomic_path(target, folder=True) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / SWITCH_FILE).write_text(json.dumps(
            {"switch_step": step, "max_steps": max_steps, "full_ratio": method_args.full_ratio}, indent=2) + "\n")
    print(f"[full_then_lora] step {step}: full weights saved to {target}; phase 2: LoRA", flush=True)
    return target


def _load_switch_weights(output_dir: Path, model, reload: bool = True):
    """The phase-2 base: the in-memory phase-1 model right after the switch, else full_phase/ from disk."""
    folder = output_dir / FULL_PHASE_DIR
    if not (folder / SWITCH_FILE).is_file():
        raise FileNotFoundError(
            f"full_then_lora: {folder} (the full weights at the switch, written at the end of phase 1) is "
            "missing or incomplete, so a LoRA-phase checkpoint cannot be resumed. Resume from the last "
            "phase-1 checkpoint (full weights) instead."
        )
    if reload:
        dtype = str(model.dtype).replace("torch.", "")
        attn = getattr(model.config, "_attn_implementation", None) or "sdpa"
        del model
        model = load_model(str(folder), dtype=dtype, attn_implementation=attn)
    # The saved adapters must point at these weights, not at the original pretrained model.
    model.config._name_or_path = str(folder.resolve())
    model.name_or_path = str(folder.resolve())
    return model


def _write_phase2_start(trainer, lora_model, tokenizer, phase1_state: TrainerState, folder: Path,
                        training_args) -> None:
    """Write checkpoint-X: what the HF Trainer needs to resume phase 2 exactly at step X.

    Every process builds the optimizer (collective setups may need all ranks); the main process
    writes the folder atomically; then each process adds its RNG state under the Trainer's file name.
    """
    # A fresh optimizer for the new LoRA parameters, built by the phase-2 Trainer itself so its parameter
    # groups are those any later resume of phase 2 builds, and the scheduler where one run would be
    # after X steps.
    trainer.create_optimizer_and_scheduler(num_training_steps=phase1_state.max_steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": intended here
        for _ in range(phase1_state.global_step):
            trainer.lr_scheduler.step()
    # The LoRA model is not prepared by an engine yet (the phase-2 Trainer wraps it in train()), so its
    # parameters are plain tensors on every rank and rank 0 can save it alone.
    if training_args.should_save:
        with atomic_path(folder, folder=True) as tmp:
            tmp.mkdir(parents=True)
            lora_model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            torch.save(trainer.optimizer.state_dict(), tmp / OPTIMIZER_NAME)
            torch.save(trainer.lr_scheduler.state_dict(), tmp / SCHEDULER_NAME)
            _write_state(phase1_state, tmp / TRAINER_STATE_NAME)
    # train() resumes from this folder like from any checkpoint: it builds the pair again (it always
    # rebuilds a scheduler it created) and loads the two files above.
    trainer.optimizer = trainer.lr_scheduler = None
    _barrier()
    rng_name = "rng_state.pth" if training_args.world_size <= 1 else f"rng_state_{training_args.process_index}.pth"
    torch.save(_rng_state(), folder / rng_name)
    _barrier()


def _write_state(phase1_state: TrainerState, path: Path) -> None:
    state = copy.deepcopy(phase1_state)
    # Phase 1's own end-of-train() summary describes a partial call; phase 2 writes the run's.
    state.log_history = [entry for entry in state.log_history if "train_runtime" not in entry]
    # stateful_callbacks are kept as phase 1 last saved them: train() restores them only with
    # restore_callback_states_from_checkpoint, and then as at that phase-1 checkpoint.
    state.save_to_json(str(path))


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rng_state() -> dict[str, Any]:
    # The layout the HF Trainer writes and restores (rng_state.pth), so resuming at X is reproducible.
    state: dict[str, Any] = {
        "python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.random.get_rng_state()
    return state


def _train_lora_phase(trainer, checkpoint: Path):
    log_trainable_parameters(trainer.model, "full_then_lora: LoRA phase")
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return trainer.model
