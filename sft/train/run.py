"""hf_sft.py's job: wire config -> tokenizer -> stream -> model/method -> HF Trainer -> checkpoints.

    run_training(config) = setup (stream, args, model) -> fit (one Trainer, or two for
    full_then_lora) -> finish (act on the Outcome the callbacks set: final model, run_end.json)

Stages live in their own modules (data, encoding, methods, loss, callbacks); this module only
connects them and owns the run-level decisions: precision, step count, resume position.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import pickle
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from transformers import Trainer, TrainerCallback

from sft.cli import StoppedRun
from sft.config import RUN_CONFIG_NAME, ConfigError, SFTConfig, write_resolved_config
from sft.data.sources import count_records, parse_sources
from sft.files import write_json_atomic
from sft.models import load_tokenizer
from sft.tokens.collate import StreamOptions
from sft.tokens.encoding import EncodeOptions
from sft.tokens.evalset import build_eval_batches, read_conversations
from sft.tokens.prefetch import PrefetchStream
from sft.tokens.stream import TrainStream
from sft.train.banner import dtype_line, start_banner
from sft.train.callbacks import (
    TRAIN_LOG_NAME,
    RunOutcome,
    StopSignalled,
    TrainingStoppedError,
    attach_callbacks,
    drop_log_entries_after,
    restore_stop_handlers,
)
from sft.train.checkpoints import (
    CHECKPOINT_RE,
    Outcome,
    allow_indexed_cpu_restore,
    check_output_dir_shared,
    check_resume_data,
    check_resume_topology,
    clear_run_end,
    data_layout,
    finish_checkpoint,
    latest_complete_checkpoint,
    read_data_state,
    remove_incomplete_checkpoints,
    reserve_run_end,
    resolve_resume,
    run_topology,
    write_run_end,
)
from sft.train.collator import BatchStats, SampleIdLog, training_collator
from sft.train.engine import EngineReport, apply_requested_engine, ddp_find_unused_parameters
from sft.train.export import is_adapter_dir
from sft.train.hybrid import run_full_then_lora
from sft.train.loss import attach_chunked_loss, choose_fused_loss
from sft.train.methods import (
    FULL_METHODS,
    count_parameters,
    load_model_for_method,
    loraplus_optimizer,
    parameter_dtypes,
    prepare_model,
    save_final,
    save_lora_init,
)
from sft.train.output_dir import claim_output_dir

logger = logging.getLogger(__name__)

ONE_ROW_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")


def cpu_supports_bf16() -> bool:
    """avx512_bf16 or AMX: bf16 matmuls are ~4x faster than fp32 there (REFERENCE §4)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(choice: str, bf16_flag: bool = False, fp16_flag: bool = False) -> str:
    """--precision wins; with auto, an explicit --bf16/--fp16 is honoured, else the hardware decides."""
    if choice != "auto":
        return choice
    if bf16_flag or fp16_flag:
        if not cpu_supports_bf16() and not torch.cuda.is_available() and bf16_flag:
            logger.warning("--bf16 on a CPU without avx512_bf16/AMX: bf16 autocast is emulated and can be "
                           "10-30x slower than fp32 here; use --precision fp32 unless you are testing bf16")
        return "bf16" if bf16_flag else "fp16"
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def encode_options_for(config: SFTConfig) -> EncodeOptions:
    return EncodeOptions(
        template=config.model.template,
        system_prompt=config.model.system_prompt,
        max_length=config.data.max_length,
        train_on_prompt=config.data.train_on_prompt,
        last_turn_only=config.data.last_turn_only,
    )


def stream_options_for(config: SFTConfig) -> StreamOptions:
    return StreamOptions(
        batch_size=config.training.per_device_train_batch_size,
        shuffle_buffer=config.data.shuffle_buffer,
        group_by_length=config.data.group_by_length,
        packing=config.data.packing,
        # flash and flex attention take a whole micro-batch as one row (their cost follows each sample's
        # own length); sdpa/eager would attend over the whole row, so rows as long as the longest sample.
        pack_one_row=config.model.attn_implementation in ONE_ROW_ATTENTION,
        flash_kwargs=config.model.attn_implementation.startswith("flash_attention"),
        max_length=config.data.max_length,
        pad_to_multiple_of=config.data.pad_to_multiple_of,
        seed=config.training.seed,
        skip_first=config.data.val_size if not config.data.val_data else 0,
        batch_tokens=config.data.batch_tokens,
        balance_batches=config.data.balance_batches,
    )


def data_layout_flags(config: SFTConfig) -> dict[str, Any]:
    """The flags (besides the topology's) that decide which samples form which micro-batch: stored with every
    data position, and a resume that changes one is refused (checkpoints.check_resume_data)."""
    d = config.data
    return {"--shuffle_buffer": d.shuffle_buffer, "--group_by_length": d.group_by_length, "--packing": d.packing,
            "--max_length": d.max_length, "--batch_tokens": d.batch_tokens, "--balance_batches": d.balance_batches,
            "--seed": config.training.seed, "--val_size": d.val_size if not d.val_data else 0, "--format": d.format}


def compute_max_steps(config: SFTConfig, sources, world_size: int) -> int:
    t = config.training
    if t.max_steps and t.max_steps > 0:
        return t.max_steps
    if any(not os.path.exists(s.path) for s in sources):
        raise ValueError("a hub dataset is streamed: give --max_steps (its length is unknown)")
    records = sum(count_records(s.path) for s in sources) - (config.data.val_size if not config.data.val_data else 0)
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * world_size
    steps = math.ceil(records * t.num_train_epochs / per_step)
    logger.info("--num_train_epochs %.2f over %d records -> %d steps", t.num_train_epochs, records, steps)
    return max(steps, 1)


def _validation_conversations(config: SFTConfig, sources) -> list:
    data = config.data
    if data.val_data:
        return list(read_conversations(data.val_data, data.format))
    if data.val_size:
        return list(read_conversations(sources[0].path, sources[0].fmt, limit=data.val_size))
    return []


def run_preview(config: SFTConfig, tokenizer) -> int:
    from sft.tokens.preview import preview

    sources = parse_sources(config.data.data, config.data.format)
    conversations = (conv for _, conv in read_conversations(sources[0].path, sources[0].fmt))
    print(preview(conversations, tokenizer, encode_options_for(config), config.data.preview,
                  color=sys.stdout.isatty()))
    return 0


@dataclass
class TrainingRun:
    """What setup() builds for fit() and finish(): one training run, before any step."""

    config: SFTConfig
    args: Any  # the TrainingArguments handed to the Trainer
    tokenizer: Any
    model: Any
    stream: TrainStream
    train_data: PrefetchStream  # what the Trainer iterates: the stream, read ahead on a thread
    eval_batches: list
    collate: Callable[[list], dict]
    sample_log: SampleIdLog
    stats: BatchStats
    precision: str
    resume: str | None
    max_steps: int
    topology: dict  # stored with every data position (checkpoints.run_topology)
    layout: dict = field(default_factory=dict)  # and this (checkpoints.data_layout)
    outcome: RunOutcome = field(default_factory=RunOutcome)
    extra_callbacks: tuple = ()
    trainers: list = field(default_factory=list)  # one per phase (full_then_lora has two)

    @property
    def main_process(self) -> bool:
        return self.args.process_index == 0

    def data_state_at(self, step: int) -> dict:
        # From the batches the Trainer consumed, not from how far the prefetching reader got.
        return {**self.train_data.state_at(step * self.args.gradient_accumulation_steps), "topology": self.topology,
                "data_layout": self.layout}


def run_training(config: SFTConfig, extra_callbacks: Sequence[TrainerCallback] = ()) -> int:
    """hf_sft.py's run: setup -> fit -> finish; run_end.json says how it ended, also on an error.

    extra_callbacks are added to every Trainer of the run (tests use them to inject faults).
    """
    from transformers import set_seed

    if not config.training.use_cpu and not torch.cuda.is_available():
        # Decide the device before anything reads world_size/process_index (gloo on CPU).
        config.training = dataclasses.replace(config.training, use_cpu=True)
    set_seed(config.training.seed)
    output_dir, main_process = config.training.output_dir, config.training.process_index == 0
    run, claimed = None, False
    with _signals_stop_start_up():
        try:
            tokenizer = load_tokenizer(config.model.tokenizer or config.model.model, config.model.trust_remote_code)
            if config.data.preview:
                return run_preview(config, tokenizer)
            claim_output_dir(config, main_process)  # a refusal writes nothing into the other run's folder
            claimed = True
            if main_process:
                reserve_run_end(output_dir)  # run_end.json can still be written when the disk fills up
            run = setup(config, tokenizer, tuple(extra_callbacks))
            if main_process:
                clear_run_end(output_dir)  # a resumed run is running again: watchers must keep waiting
                trainable, total = count_parameters(run.model)
                dtypes = dtype_line(parameter_dtypes(run.model), run.precision,
                                    full=config.method.finetuning_type in FULL_METHODS)
                print(start_banner(config, trainable, total, world_size=run.args.world_size,
                                   max_steps=run.max_steps, dtypes=dtypes), flush=True)
            finish(run, fit(run))
            if run.outcome.outcome is not Outcome.SIGNALLED:  # a stop may not reach every rank: no barrier then
                _leave_process_group()
        except BaseException as err:
            _explain_stop(err, run)
            if claimed and main_process:
                _write_failed_run_end(err, run, output_dir)
            if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                raise DiskFullError(_disk_full_message(err, output_dir)) from err
            raise
    if run.outcome.outcome is Outcome.SIGNALLED:  # run_end.json says "stopped"; the exit status (128 + signal) too
        stop = StopSignalled(run.outcome.signum or signal.SIGTERM)
        stop.args = (run.outcome.message,)
        raise stop
    return 0


class DiskFullError(StoppedRun):
    """The disk filled up: one line that says where and how to go on (no traceback)."""


def _disk_full_message(err: OSError, output_dir: str) -> str:
    where = f" writing {err.filename}" if err.filename else ""
    latest = latest_complete_checkpoint(output_dir)
    resume = (f"the last complete checkpoint is {latest}" if latest else "no checkpoint was completed")
    return (f"no space left on the device{where} ({err.strerror or err}). Free space there (or point --output_dir "
            f"at a larger disk), then resume with --resume_from_checkpoint auto; {resume}.")


def _leave_process_group() -> None:
    """After a finished run: wait for every rank, then shut the process group down before the interpreter exits.

    A rank that exits with its gloo/NCCL group still alive while another rank is still writing (rank 0's
    run_end.json) can abort in the group's destructor ("terminate called without an active exception",
    SIGABRT), which fails the whole launch although training finished.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


@contextmanager
def _signals_stop_start_up():
    """SIGTERM/SIGINT outside the training loop (start-up, final save) raise StopSignalled, so the run ends
    through run_training's error path and writes run_end.json; GracefulStopCallback takes over while training."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise StopSignalled(signum, "outside the training loop")

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _explain_stop(err: BaseException, run: "TrainingRun | None") -> None:
    """A StopSignalled's message says where the run stopped and how to go on."""
    if isinstance(err, StopSignalled):
        step = _global_step(run) if run is not None else None
        where = f"at step {step}" if step is not None else "during start-up"
        err.args = (f"{err.args[0]} {where}; resume from the last complete checkpoint with "
                    "--resume_from_checkpoint auto",)


def _write_failed_run_end(err: BaseException, run: "TrainingRun | None", output_dir: str) -> None:
    """run_end.json for a run that ends by an exception: stopped (a signal) or failed."""
    step = _global_step(run) if run is not None else None
    if isinstance(err, StopSignalled):
        write_run_end(output_dir, Outcome.SIGNALLED, str(err), global_step=step)
        return
    outcome = Outcome.NONFINITE if isinstance(err, TrainingStoppedError) else Outcome.FAILED
    write_run_end(output_dir, outcome, f"{type(err).__name__}: {err}", global_step=step)


def setup(config: SFTConfig, tokenizer, extra_callbacks: tuple = ()) -> TrainingRun:
    """Data stream (restored when resuming), validation batches, TrainingArguments, prepared model."""
    t = config.training
    sources = parse_sources(config.data.data, config.data.format)
    rank, world = t.process_index, t.world_size
    encode_options = encode_options_for(config)
    stream_options = stream_options_for(config)
    max_steps = compute_max_steps(config, sources, world)
    check_output_dir_shared(t.output_dir, rank, world)
    resume = resolve_resume(t.resume_from_checkpoint, t.output_dir)
    topology = run_topology(world, t.per_device_train_batch_size, t.gradient_accumulation_steps)
    layout = data_layout(data_layout_flags(config), sources)

    stream = TrainStream(sources, tokenizer, encode_options, stream_options, rank=rank, world_size=world,
                         rejects_path=os.path.join(t.output_dir, f"train_rejects-rank{rank}.jsonl"))
    if resume:
        check_resume_topology(resume, topology, adapter=is_adapter_dir(resume))
        check_resume_data(resume, layout, adapter=is_adapter_dir(resume))
        stream.load_state(read_data_state(resume, rank, world))
        _forget_after(resume, config, rank)
    elif t.resume_from_checkpoint:  # auto found no checkpoint: a killed attempt's logs start over too
        _forget_after(None, config, rank)
    eval_batches = build_eval_batches(_validation_conversations(config, sources), tokenizer, encode_options,
                                      dataclasses.replace(stream_options, batch_size=t.per_device_eval_batch_size))
    if config.data.early_stopping_patience and not eval_batches:
        raise ConfigError(f"--early_stopping_patience {config.data.early_stopping_patience}: the validation data "
                          "gave no batches (every record was rejected?); early stopping needs a validation loss")

    precision = resolve_precision(config.model.precision, t.bf16, t.fp16)
    args = _trainer_args(config, max_steps, precision, has_eval=bool(eval_batches))
    if rank == 0:
        write_resolved_config(config, t.output_dir)

    model = prepare_model(load_model_for_method(config.model, config.method, args), config.method, args)
    if rank == 0:
        save_lora_init(model, config.method, t.output_dir)  # pissa/olora: what the final adapter is converted against
    # A KV cache object in the forward breaks packed-sample isolation and is useless in training.
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    # Every trainable parameter of a dense model is used each step: no extra graph traversal under DDP.
    args.ddp_find_unused_parameters = ddp_find_unused_parameters(model, t.ddp_find_unused_parameters)
    stats = BatchStats()
    train_data = PrefetchStream(stream, prefetch_depth(config.data.prefetch_batches, args))
    stats.data_wait = train_data.waited
    sample_log = SampleIdLog(os.path.join(t.output_dir, f"sample_ids-rank{rank}.jsonl")
                             if config.data.log_sample_ids else None, args.gradient_accumulation_steps)
    return TrainingRun(config=config, args=args, tokenizer=tokenizer, model=model, stream=stream,
                       train_data=train_data,
                       eval_batches=eval_batches, collate=training_collator(stats, sample_log), sample_log=sample_log,
                       stats=stats, precision=precision, resume=resume, max_steps=max_steps,
                       topology=topology, layout=layout, extra_callbacks=extra_callbacks)


def _forget_after(resume: str | None, config: SFTConfig, rank: int) -> None:
    """Resuming from checkpoint-N (None: from the start): what the interrupted run wrote after step N goes. Its
    log entries (the steps are trained and logged again) and, on the main process, incomplete checkpoint folders
    (a killed save's files, e.g. safetensors' `.tmpXXXXXX`, must not end up inside the folder when that step is
    saved again)."""
    out = config.training.output_dir
    match = CHECKPOINT_RE.match(Path(resume).name) if resume else None
    if resume and (match is None or Path(resume).resolve().parent != Path(out).resolve()):
        return  # a checkpoint of another folder: this run's logs start with it
    step = int(match.group(1)) if match else 0
    drop_log_entries_after(Path(out) / f"sample_ids-rank{rank}.jsonl", step)
    if rank == 0:
        drop_log_entries_after(Path(out) / TRAIN_LOG_NAME, step)
        remove_incomplete_checkpoints(out)


def prefetch_depth(requested: int | None, args) -> int:
    """--prefetch_batches, or its default: 4 on a GPU, 0 on a CPU (a reader thread would take a core from training)."""
    if requested is not None:
        return requested
    return 0 if args.use_cpu or not torch.cuda.is_available() else 4


def make_trainer(run: TrainingRun, model, args) -> Trainer:
    """One HF Trainer over the run's stream, collator, loss and callbacks (full_then_lora makes two)."""
    # The model returns the loss: computed in its forward, where engines gather the head.
    fused = choose_fused_loss(run.config.model.fused_loss, torch.device(args.device).type)
    if not run.trainers and run.main_process:
        logger.info("loss: %s (--fused_loss %s)", "Liger Kernel's fused linear cross-entropy" if fused == "liger"
                    else "chunked linear cross-entropy (sft.train.linear_cross_entropy)", run.config.model.fused_loss)
    attach_chunked_loss(model, fused_loss=fused)
    allow_indexed_cpu_restore()  # transformers 5.17 resumes a multi-process CPU run's optimizer to "cpu:0"
    trainer = Trainer(model=model, args=args, train_dataset=run.train_data, eval_dataset=run.eval_batches or None,
                      data_collator=run.collate, processing_class=run.tokenizer,
                      optimizer_cls_and_kwargs=loraplus_optimizer(run.config.method, args))
    apply_requested_engine(trainer)  # FSDP on CPU, or a loud warning when the launch asked for another engine
    attach_callbacks(trainer, run.stats, run.outcome, data_state_fn=run.data_state_at,
                     early_stopping_patience=run.config.data.early_stopping_patience,
                     save_total_limit=run.config.training.save_total_limit,
                     reading=lambda: run.train_data.reading,
                     tensorboard="tensorboard" in (args.report_to or []))
    callbacks = [run.sample_log, EngineReport(), *run.extra_callbacks]
    if run.config.data.packing and not run.trainers:
        callbacks.insert(0, PackingIsolationCheck(run))
    for callback in callbacks:
        trainer.add_callback(callback)
    run.trainers.append(trainer)
    return trainer


def fit(run: TrainingRun):
    """Train to max_steps or until a callback stops the run; returns the trained model.

    However training ends, the stop-signal handlers go back; a checkpoint that cannot be loaded into this
    model (another model's, a refused pickle) becomes a clear error naming it.
    """
    try:
        return _fit(run)
    except pickle.UnpicklingError as err:
        raise ValueError(_refused_pickle_message(run.resume, err)) from None
    except RuntimeError as err:
        if run.resume and "size mismatch" in str(err):
            raise ValueError(_other_model_message(run, err)) from None
        raise
    finally:
        for trainer in run.trainers:
            restore_stop_handlers(trainer)


def _refused_pickle_message(checkpoint: str | None, err: Exception) -> str:
    """Which torch file of `checkpoint` torch.load(weights_only=True) refuses, found by loading each again
    (with the numpy types the Trainer allows for its RNG state)."""
    from transformers.trainer_pt_utils import safe_globals

    bad = []
    for path in sorted(Path(checkpoint).rglob("*")) if checkpoint else ():
        # training_args.bin is a pickled object by design; resuming never loads it
        if path.is_file() and path.suffix in (".pt", ".pth", ".bin") and path.name != "training_args.bin":
            try:
                with safe_globals():
                    torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # any refusal or damage is what we are looking for
                bad.append(str(path))
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"--resume_from_checkpoint {checkpoint}: {', '.join(bad) or 'a file of the checkpoint'} is not a plain "
            f"tensor file: torch.load(weights_only=True) refused it ({first}). It is corrupt, or was not written by "
            "hf_sft.py (nothing in it was run). Resume from another checkpoint, or start a new run from these "
            "weights with --model and no --resume_from_checkpoint.")


def _other_model_message(run: TrainingRun, err: Exception) -> str:
    """A size mismatch while loading the checkpoint: it belongs to another model than --model."""
    checkpoint = run.resume
    trained = None
    saved_config = Path(checkpoint).parent / RUN_CONFIG_NAME
    if saved_config.is_file():
        import yaml

        try:
            trained = (yaml.safe_load(saved_config.read_text(encoding="utf-8")) or {}).get("model")
        except yaml.YAMLError:
            trained = None
    detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), "")
    source = f" (its run trained --model {trained})" if trained else ""
    return (f"--resume_from_checkpoint {checkpoint}: its weights do not fit --model {run.config.model.model}"
            f"{source}: {detail}. A checkpoint resumes only with the model it was trained from: give that --model, "
            "or resume a checkpoint of this model.")


def _fit(run: TrainingRun):
    if run.config.method.finetuning_type != "full_then_lora":
        trainer = make_trainer(run, run.model, run.args)
        if _resumed_step(run.resume) >= run.max_steps:
            return _load_finished(trainer, run.resume)
        trainer.train(resume_from_checkpoint=run.resume)
        return run.trainers[-1].model
    rank, world = run.args.process_index, run.args.world_size
    return run_full_then_lora(
        lambda model, args: make_trainer(run, model, args), run.model, run.tokenizer, run.config.method, run.args,
        run.resume,
        finish_checkpoint=lambda folder, step: finish_checkpoint(folder, step, run.data_state_at(step), run.args),
        # Phase 2 must continue the stream where phase 1 stopped, not restart it.
        before_lora_phase=lambda ckpt: run.train_data.load_state(read_data_state(ckpt, rank, world)),
        load_finished=_load_finished if _resumed_step(run.resume) >= run.max_steps else None)


def _resumed_step(checkpoint: str | None) -> int:
    match = CHECKPOINT_RE.match(Path(checkpoint).name) if checkpoint else None
    return int(match.group(1)) if match else -1


def _load_finished(trainer: Trainer, checkpoint: str):
    """Resuming a checkpoint already at --max_steps (killed after its last save, before the final model): the
    Trainer would train one step past max_steps and save again (found by bench/soak_kill.py). Load its weights
    and state instead; finish() then writes the final model."""
    from transformers.trainer_callback import TrainerState

    logger.info("%s is at --max_steps %d already: nothing left to train, saving it as the final model",
                checkpoint, trainer.args.max_steps)
    trainer._load_from_checkpoint(checkpoint)  # the Trainer's own loader (weights or adapter, any layout it wrote)
    trainer.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
    return trainer.model


def finish(run: TrainingRun, model) -> None:
    """Act on the outcome: a fault raises; otherwise save the final model if it is final, write run_end.json."""
    run.train_data.stop()  # the reader thread has nothing more to prepare
    outcome = run.outcome
    if outcome.outcome is Outcome.NONFINITE:
        raise TrainingStoppedError(outcome.message)
    output_dir = run.args.output_dir
    final = outcome.outcome.saves_final_model
    if final:  # on every process: a sharded model is gathered by all ranks, then written by rank 0
        save_final(model, run.tokenizer, output_dir, run.config.method,
                   trainer=run.trainers[-1] if run.trainers else None)
    if not run.main_process:
        return
    if outcome.message:
        (logger.info if final else logger.warning)(outcome.message)
    _write_summary(output_dir, run.stream)
    write_run_end(output_dir, outcome.outcome, outcome.message, final_model=output_dir if final else None,
                  global_step=_global_step(run))
    logger.info("%s: %s; data: %s; %s", "Finished" if final else "Stopped", output_dir, run.stream.counters,
                run.stream.encode_stats.summary())
    print(next_command(output_dir, resume=not final), flush=True)


def next_command(output_dir: str, resume: bool = False) -> str:
    """What to run next, printed when training ends (the README's next step)."""
    if resume:
        return (f"Next: continue with the same command plus --resume_from_checkpoint auto, or see what the checkpoints "
                f"learned: python hf_sft_eval.py --run {output_dir}")
    return f"Next: see what it learned (base model vs each checkpoint): python hf_sft_eval.py --run {output_dir}"


def _global_step(run: TrainingRun) -> int | None:
    return run.trainers[-1].state.global_step if run.trainers else None


def check_packing_isolation(model, tokenizer, name: str, one_row: bool = False, flash_kwargs: bool = False) -> None:
    """Refuse --packing for a model whose attention does not keep packed samples apart (run it on the
    training device, after placement: the attention kernel there is the one that must isolate)."""
    from sft.tokens.collate import checked_pad_id, isolation_tolerance, packing_leak

    leak = packing_leak(model, checked_pad_id(tokenizer), one_row=one_row, flash_kwargs=flash_kwargs)
    tolerance = isolation_tolerance(model)
    if leak > tolerance:
        raise ConfigError(f"--packing: model {name} lets packed samples attend to each other (logits change by "
                          f"{leak:.1%} when two samples share a row, tolerance {tolerance:.1%}). Its attention "
                          f"({getattr(model.config, '_attn_implementation', '?')}) does not build the per-sample "
                          "mask from position_ids; train it with --packing false.")
    logger.info("Packing isolation checked on %s: packed and separate logits agree (relative difference %.1e, "
                "tolerance %.0e)", next(model.parameters()).device, leak, tolerance)


class PackingIsolationCheck(TrainerCallback):
    """check_packing_isolation at train begin: the model is then on its training device (and wrapped by
    the engine), so the check runs the attention kernel training will use. Once per run."""

    def __init__(self, run: "TrainingRun"):
        self.run, self.done = run, False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.done or model is None:
            return
        options = stream_options_for(self.run.config)
        check_packing_isolation(model, self.run.tokenizer, self.run.config.model.model,
                                one_row=options.pack_one_row, flash_kwargs=options.flash_kwargs)
        self.done = True


def _trainer_args(config: SFTConfig, max_steps: int, precision: str, has_eval: bool):
    """The TrainingArguments handed to the Trainer (the stream yields whole batches)."""
    from sft.train.checkpoints import checkpoint_args_overrides

    t = config.training
    changes = dict(
        per_device_train_batch_size=1,  # our stream yields collated micro-batches
        per_device_eval_batch_size=1,
        max_steps=max_steps,
        ignore_data_skip=True,  # the stream restores its own position; never replay consumed batches
        accelerator_config={"dispatch_batches": False, "split_batches": False},
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=t.use_cpu or not torch.cuda.is_available(),
        dataloader_num_workers=0,
        logging_nan_inf_filter=False,  # a diverged step is logged as NaN, not as the average of earlier losses
    )
    if has_eval:
        changes.update(eval_strategy="steps", eval_steps=t.eval_steps or t.save_steps)
        changes.update(checkpoint_args_overrides(True))
    else:
        changes.update(checkpoint_args_overrides(False))
    args = dataclasses.replace(t, **changes)
    use_one_gpu_without_launcher(args)
    return args


def use_one_gpu_without_launcher(args, argv: Sequence[str] | None = None) -> bool:
    """`python hf_sft.py` on a machine with N GPUs: train on GPU 0 and name the launch command for all N.

    Without a launcher the Trainer wraps the model in DataParallel (args.n_gpu = N) and multiplies the
    DataLoader batch size by N, which the stream's whole-batch DataLoader refuses at the first batch.
    A launched process (accelerate launch, torchrun) always has n_gpu 1, so n_gpu > 1 means: no launcher.
    Returns whether it restricted the run.
    """
    gpus = args.n_gpu
    if gpus <= 1:
        return False
    args._n_gpu = 1  # as the Trainer itself does for model parallelism: no DataParallel, batch size stays 1
    logger.warning(
        "%d GPUs are visible but hf_sft.py was started as one process, without a launcher: training on "
        "GPU 0 only. To train on all %d GPUs (one process each, DDP), run:\n  %s", gpus, gpus,
        launch_command(gpus, argv))
    return True


def launch_command(processes: int, argv: Sequence[str] | None = None) -> str:
    """The `accelerate launch` command that runs this very hf_sft.py command line on `processes` GPUs."""
    import shlex

    argv = list(sys.argv if argv is None else argv)
    ours = bool(argv) and argv[0].endswith("hf_sft.py")  # else called as a library: flags unknown here
    script, flags = (argv[0], argv[1:]) if ours else ("hf_sft.py", ["..."])
    return shlex.join(["accelerate", "launch", "--num_processes", str(processes), script, *flags])


def _write_summary(output_dir: str, stream: TrainStream) -> None:
    write_json_atomic(Path(output_dir) / "data_summary.json", stream.counters, indent=2)
