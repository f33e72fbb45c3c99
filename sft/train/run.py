"""hf_sft.py's job: wire config -> tokenizer -> stream -> model/method -> HF Trainer -> checkpoints.

    run_training(config) = setup (stream, args, model) -> fit (one Trainer, or two for
    full_then_lora) -> finish (act on the Outcome the callbacks set: final model, run_end.json)

Stages live in their own modules (data, encoding, methods, loss, callbacks); this module only
connects them and owns the run-level decisions: precision, step count, resume position.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from transformers import Trainer, TrainerCallback

from sft.config import ConfigError, SFTConfig, write_resolved_config
from sft.data.sources import count_records, parse_sources
from sft.models import load_tokenizer
from sft.tokens.collate import StreamOptions
from sft.tokens.encoding import EncodeOptions
from sft.tokens.evalset import build_eval_batches, read_conversations
from sft.tokens.stream import TrainStream
from sft.train.banner import dtype_line, start_banner
from sft.train.callbacks import (
    RunOutcome,
    StopSignalled,
    TrainingStoppedError,
    attach_callbacks,
)
from sft.train.checkpoints import (
    Outcome,
    check_output_dir_shared,
    check_resume_topology,
    clear_run_end,
    finish_checkpoint,
    read_data_state,
    resolve_resume,
    run_topology,
    write_run_end,
)
from sft.train.collator import BatchStats, SampleIdLog, training_collator
from sft.train.engine import EngineReport, apply_requested_engine
from sft.train.export import is_adapter_dir
from sft.train.hybrid import run_full_then_lora
from sft.train.loss import attach_chunked_loss
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
        pack_one_row=config.model.attn_implementation.startswith("flash_attention"),
        max_length=config.data.max_length,
        pad_to_multiple_of=config.data.pad_to_multiple_of,
        seed=config.training.seed,
        skip_first=config.data.val_size if not config.data.val_data else 0,
        batch_tokens=config.data.batch_tokens,
        balance_batches=config.data.balance_batches,
    )


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
    eval_batches: list
    collate: Callable[[list], dict]
    sample_log: SampleIdLog
    stats: BatchStats
    precision: str
    resume: str | None
    max_steps: int
    topology: dict  # stored with every data position (checkpoints.run_topology)
    outcome: RunOutcome = field(default_factory=RunOutcome)
    extra_callbacks: tuple = ()
    trainers: list = field(default_factory=list)  # one per phase (full_then_lora has two)

    @property
    def main_process(self) -> bool:
        return self.args.process_index == 0

    def data_state_at(self, step: int) -> dict:
        return {**self.stream.state_at(step * self.args.gradient_accumulation_steps), "topology": self.topology}


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
            run = setup(config, tokenizer, tuple(extra_callbacks))
            if main_process:
                clear_run_end(output_dir)  # a resumed run is running again: watchers must keep waiting
                trainable, total = count_parameters(run.model)
                dtypes = dtype_line(parameter_dtypes(run.model), run.precision,
                                    full=config.method.finetuning_type in FULL_METHODS)
                print(start_banner(config, trainable, total, world_size=run.args.world_size,
                                   max_steps=run.max_steps, dtypes=dtypes), flush=True)
            finish(run, fit(run))
            _leave_process_group()
        except BaseException as err:
            _explain_stop(err, run)
            if claimed and main_process:
                _write_failed_run_end(err, run, output_dir)
            raise
    return 0


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

    stream = TrainStream(sources, tokenizer, encode_options, stream_options, rank=rank, world_size=world,
                         rejects_path=os.path.join(t.output_dir, f"train_rejects-rank{rank}.jsonl"))
    if resume:
        check_resume_topology(resume, topology, adapter=is_adapter_dir(resume))
        stream.load_state(read_data_state(resume, rank, world))
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
    if config.data.packing and not stream_options.pack_one_row:
        check_packing_isolation(model, tokenizer, config.model.model)
    stats = BatchStats()
    sample_log = SampleIdLog(os.path.join(t.output_dir, f"sample_ids-rank{rank}.jsonl")
                             if config.data.log_sample_ids else None, args.gradient_accumulation_steps)
    return TrainingRun(config=config, args=args, tokenizer=tokenizer, model=model, stream=stream,
                       eval_batches=eval_batches, collate=training_collator(stats, sample_log), sample_log=sample_log,
                       stats=stats, precision=precision, resume=resume, max_steps=max_steps,
                       topology=topology, extra_callbacks=extra_callbacks)


def make_trainer(run: TrainingRun, model, args) -> Trainer:
    """One HF Trainer over the run's stream, collator, loss and callbacks (full_then_lora makes two)."""
    attach_chunked_loss(model)  # the model returns the loss: computed in its forward, where engines gather the head
    trainer = Trainer(model=model, args=args, train_dataset=run.stream, eval_dataset=run.eval_batches or None,
                      data_collator=run.collate, processing_class=run.tokenizer,
                      optimizer_cls_and_kwargs=loraplus_optimizer(run.config.method, args))
    apply_requested_engine(trainer)  # FSDP on CPU, or a loud warning when the launch asked for another engine
    attach_callbacks(trainer, run.stats, run.outcome, data_state_fn=run.data_state_at,
                     early_stopping_patience=run.config.data.early_stopping_patience,
                     save_total_limit=run.config.training.save_total_limit,
                     reading=lambda: run.stream.reading,
                     tensorboard="tensorboard" in (args.report_to or []))
    for callback in (run.sample_log, EngineReport(), *run.extra_callbacks):
        trainer.add_callback(callback)
    run.trainers.append(trainer)
    return trainer


def fit(run: TrainingRun):
    """Train to max_steps or until a callback stops the run; returns the trained model."""
    if run.config.method.finetuning_type != "full_then_lora":
        make_trainer(run, run.model, run.args).train(resume_from_checkpoint=run.resume)
        return run.trainers[-1].model
    rank, world = run.args.process_index, run.args.world_size
    return run_full_then_lora(
        lambda model, args: make_trainer(run, model, args), run.model, run.tokenizer, run.config.method, run.args,
        run.resume,
        finish_checkpoint=lambda folder, step: finish_checkpoint(folder, step, run.data_state_at(step), run.args),
        # Phase 2 must continue the stream where phase 1 stopped, not restart it.
        before_lora_phase=lambda ckpt: run.stream.load_state(read_data_state(ckpt, rank, world)))


def finish(run: TrainingRun, model) -> None:
    """Act on the outcome: a fault raises; otherwise save the final model if it is final, write run_end.json."""
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
    logger.info("Finished: %s; data: %s; %s", output_dir, run.stream.counters, run.stream.encode_stats.summary())
    print(next_command(output_dir, resume=not final), flush=True)


def next_command(output_dir: str, resume: bool = False) -> str:
    """What to run next, printed when training ends (the README's next step)."""
    if resume:
        return (f"Next: continue with the same command plus --resume_from_checkpoint auto, or see what the checkpoints "
                f"learned: python hf_sft_eval.py --run {output_dir}")
    return f"Next: see what it learned (base model vs each checkpoint): python hf_sft_eval.py --run {output_dir}"


def _global_step(run: TrainingRun) -> int | None:
    return run.trainers[-1].state.global_step if run.trainers else None


def check_packing_isolation(model, tokenizer, name: str) -> None:
    """Refuse --packing for a model whose attention does not keep packed samples apart."""
    from sft.tokens.collate import checked_pad_id, packing_leak

    leak = packing_leak(model, checked_pad_id(tokenizer))
    if leak > 1e-3:
        raise ConfigError(f"--packing: model {name} lets packed samples attend to each other (logits change by "
                          f"{leak:.1%} when two samples share a row). Its attention does not build the "
                          "per-sample mask from position_ids; train it with --packing false.")
    logger.info("Packing isolation checked: packed and separate logits agree (relative difference %.1e)", leak)


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
    path = Path(output_dir) / "data_summary.json"
    path.write_text(json.dumps(stream.counters, indent=2))
