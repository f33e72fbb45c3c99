"""hf_sft.py's job: wire config -> tokenizer -> stream -> model/method -> HF Trainer -> checkpoints.

Stages live in their own modules (data, encoding, methods, loss, callbacks); this module only
connects them and owns the run-level decisions: precision, step count, resume position.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from sft.config import ConfigError, SFTConfig, write_resolved_config
from sft.data.sources import parse_sources
from sft.models import load_tokenizer
from sft.tokens.collate import unwrap_collate
from sft.tokens.encoding import EncodeOptions
from sft.tokens.evalset import build_eval_batches, read_conversations
from sft.tokens.stream import StreamOptions, TrainStream, count_records

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


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    from sft.train.checkpoints import is_complete_checkpoint, latest_complete_checkpoint

    if not value:
        return None
    if value == "auto":
        found = latest_complete_checkpoint(output_dir)
        if found:
            logger.info("Resuming from %s", found)
        else:
            logger.info("--resume_from_checkpoint auto: no complete checkpoint in %s, starting fresh", output_dir)
        return found
    if not os.path.isdir(value):
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: no such checkpoint folder")
    if not is_complete_checkpoint(value):
        raise ValueError(f"--resume_from_checkpoint {value}: the checkpoint is incomplete (no COMPLETE marker; "
                         "the run was killed while saving it). Use an earlier checkpoint or 'auto'.")
    return value


def load_data_state(checkpoint: str, rank: int) -> dict:
    for name in (f"data_state-rank{rank}.json", "data_state.json"):
        path = Path(checkpoint) / name
        if path.is_file():
            return json.loads(path.read_text())
    raise FileNotFoundError(f"{checkpoint} has no data_state.json: it was not written by hf_sft.py and its "
                            "stream position is unknown")


def compute_max_steps(config: SFTConfig, sources, world_size: int) -> int:
    t = config.training
    if t.max_steps and t.max_steps > 0:
        return t.max_steps
    if any(not os.path.exists(s.path) for s in sources):
        raise ValueError("a hub dataset is streamed: give --max_steps (its length is unknown)")
    records = count_records(sources) - (config.data.val_size if not config.data.val_data else 0)
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


def run_training(config: SFTConfig) -> int:
    from transformers import Trainer, set_seed

    from sft.train.checkpoints import clear_run_end, write_run_end
    from sft.train.hybrid import run_full_then_lora
    from sft.train.loss import make_loss_func
    from sft.train.methods import (
        count_parameters,
        load_model_for_method,
        prepare_model,
        save_final,
    )
    from sft.train import callbacks as cb
    from sft.train.banner import start_banner

    if not config.training.use_cpu and not torch.cuda.is_available():
        # Decide the device before anything reads world_size/process_index (gloo on CPU).
        config.training = dataclasses.replace(config.training, use_cpu=True)
    t = config.training
    set_seed(t.seed)
    tokenizer = load_tokenizer(config.model.tokenizer or config.model.model, config.model.trust_remote_code)
    if config.data.preview:
        return run_preview(config, tokenizer)

    sources = parse_sources(config.data.data, config.data.format)
    rank, world = t.process_index, t.world_size
    encode_options = encode_options_for(config)
    stream_options = stream_options_for(config)
    max_steps = compute_max_steps(config, sources, world)
    resume = resolve_resume(t.resume_from_checkpoint, t.output_dir)

    stream = TrainStream(sources, tokenizer, encode_options, stream_options, rank=rank, world_size=world,
                         rejects_path=os.path.join(t.output_dir, f"train_rejects-rank{rank}.jsonl"))
    if resume:
        stream.load_state(load_data_state(resume, rank))
    eval_batches = build_eval_batches(_validation_conversations(config, sources), tokenizer, encode_options,
                                      dataclasses.replace(stream_options, batch_size=t.per_device_eval_batch_size))

    precision = resolve_precision(config.model.precision, t.bf16, t.fp16)
    args = _trainer_args(config, max_steps, precision, has_eval=bool(eval_batches))
    if t.process_index == 0:
        write_resolved_config(config, t.output_dir)

    model = prepare_model(load_model_for_method(config.model, config.method, args), config.method, args)
    # A KV cache object in the forward breaks packed-sample isolation and is useless in training.
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    if config.data.packing and not stream_options.pack_one_row:
        check_packing_isolation(model, tokenizer, config.model.model)
    stats = cb.BatchStats()
    sample_log = SampleIdLog(os.path.join(t.output_dir, f"sample_ids-rank{rank}.jsonl")
                             if config.data.log_sample_ids else None, args.gradient_accumulation_steps)
    collate = training_collator(stats, sample_log)
    runs: list = []
    trainers: list = []  # one per phase (full_then_lora has two)

    def make_trainer(model_, args_):
        trainer = Trainer(model=model_, args=args_, train_dataset=stream, eval_dataset=eval_batches or None,
                          data_collator=collate, processing_class=tokenizer,
                          compute_loss_func=make_loss_func(model_, autocast_dtype=_autocast_dtype(precision)))
        runs.append(cb.attach_callbacks(
            trainer, stats, data_state_fn=lambda step: stream.state_at(step * args_.gradient_accumulation_steps),
            early_stopping_patience=config.data.early_stopping_patience,
            tensorboard="tensorboard" in (args_.report_to or [])))
        trainer.add_callback(sample_log)
        trainers.append(trainer)
        if os.environ.get("SFT_FAULT_KILL_AFTER_SAVE"):
            trainer.add_callback(KillAfterSave(int(os.environ["SFT_FAULT_KILL_AFTER_SAVE"])))
        return trainer

    if rank == 0:
        clear_run_end(t.output_dir)  # a resumed run is running again: watchers must keep waiting
        trainable, total = count_parameters(model)
        print(start_banner(config, trainable, total, world_size=world, max_steps=max_steps), flush=True)
    try:
        if config.method.finetuning_type == "full_then_lora":
            # Phase 2 must continue the stream where phase 1 stopped, not restart it.
            model = run_full_then_lora(make_trainer, model, tokenizer, config.method, args, resume,
                                       before_lora_phase=lambda ckpt: stream.load_state(load_data_state(ckpt, rank)))
        else:
            make_trainer(model, args).train(resume_from_checkpoint=resume)
        for run in runs:
            cb.raise_if_nonfinite(run.nonfinite, t.output_dir)
    except BaseException as err:
        if rank == 0:
            write_run_end(t.output_dir, "failed", f"{type(err).__name__}: {err}")
        raise
    stopped = next((m for m in (cb.stop_message(run) for run in runs) if m), None)
    if rank == 0:
        if stopped and "early stopping" not in stopped:
            logger.warning(stopped)
        else:
            save_final(model, tokenizer, t.output_dir, config.method)
            if stopped:
                logger.info(stopped)
        _write_summary(t.output_dir, stream)
        final = stopped is None or "early stopping" in stopped
        write_run_end(t.output_dir, "finished" if final else "stopped", stopped or "",
                      final_model=t.output_dir if final else None, global_step=trainers[-1].state.global_step)
        logger.info("Finished: %s; data: %s; %s", t.output_dir, stream.counters, stream.encode_stats.summary())
    return 0


def check_packing_isolation(model, tokenizer, name: str) -> None:
    """Refuse --packing for a model whose attention does not keep packed samples apart."""
    from sft.tokens.collate import checked_pad_id, packing_leak

    leak = packing_leak(model, checked_pad_id(tokenizer))
    if leak > 1e-3:
        raise ConfigError(f"--packing: model {name} lets packed samples attend to each other (logits change by "
                          f"{leak:.1%} when two samples share a row). Its attention does not build the "
                          "per-sample mask from position_ids; train it with --packing false.")
    logger.info("Packing isolation checked: packed and separate logits agree (relative difference %.1e)", leak)


def training_collator(stats, sample_log: "SampleIdLog"):
    """Unwrap the stream's pre-collated batch, record its stats, add the loss's model kwargs.

    Evaluation batches (no sample ids) go through the same collator but are not counted.
    """
    from sft.train.loss import loss_model_kwargs

    def collate(items: list[dict]) -> dict:
        batch = dict(unwrap_collate(items))
        ids = batch.pop("sample_ids", None)
        if ids is not None:
            sample_log.record(ids)
            stats.record(batch)
        batch.pop("padding_tokens", None)  # a count for the stats, not a model input
        batch.update(loss_model_kwargs())
        return batch

    return collate


def _autocast_dtype(precision: str):
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


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
    return args


class SampleIdLog(TrainerCallback):
    """Writes the sample ids used by each optimizer step (for reproducibility checks)."""

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


class KillAfterSave(TrainerCallback):
    """Fault injection for tests: SIGKILL this process right after checkpoint-N is complete."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


def _write_summary(output_dir: str, stream: TrainStream) -> None:
    path = Path(output_dir) / "data_summary.json"
    path.write_text(json.dumps(stream.counters, indent=2))
