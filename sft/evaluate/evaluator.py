"""Evaluate a run's checkpoints (and its base model, as step 0) once each, on the CPU.

    setup = EvalSetup.from_run("outputs/demo", args, generation)  # the run's own template, data, masking
    evaluate_run(setup, watch=True)                              # RUN/eval/{metrics.jsonl, predictions-*.jsonl, ...}

What was evaluated is what `eval/metrics.jsonl` holds (one line per step, appended when done), so a
restarted evaluator continues where it stopped. A step being evaluated is claimed (eval/locks/step-N.lock,
flock'ed): a second evaluator on the same run skips it, and the claim of a killed one is free at once.
Only checkpoints with the trainer's COMPLETE marker are read, and a checkpoint deleted by rotation while
it is being read is logged and skipped.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from sft.config import BASE_CHANGING_INITS, SFTConfig, load_run_config
from sft.conversation import Conversation
from sft.data.sources import split_weight
from sft.evaluate.inference import (
    Generated,
    generate_answers,
    is_adapter_dir,
    load_for_inference,
    prompt_ids,
    read_prompt_records,
    resolve_eval_dtype,
)
from sft.evaluate.metrics import validate_check
from sft.evaluate.options import EvalArguments, GenerationOptions
from sft.files import write_text_atomic
from sft.models import load_model
from sft.tokens.collate import StreamOptions
from sft.tokens.encoding import EncodeOptions
from sft.tokens.evalset import build_eval_batches, read_conversations
from sft.train.checkpoints import (
    complete_checkpoints,
    is_complete_checkpoint,
    read_run_end,
)
from sft.train.loss import attach_chunked_loss
from sft.train.run import encode_options_for

logger = logging.getLogger(__name__)

EVAL_DIR = "eval"
METRICS_NAME = "metrics.jsonl"
ERRORS_NAME = "errors.jsonl"
BASE_STEP = 0


@dataclass
class PromptItem:
    id: str
    conversation: Conversation
    reference: str | None
    check: dict | None
    kind: str


@dataclass
class EvalSetup:
    run_dir: Path
    base_model: str
    encode: EncodeOptions
    val: list[tuple[str, Conversation]]
    prompts: list[PromptItem]
    general: list[PromptItem]
    generation: GenerationOptions
    eval_batch_size: int = 8
    include_base: bool = True
    poll_seconds: float = 10.0
    sources: dict[str, str | None] = field(default_factory=dict)
    dtype: str = "float32"  # the weights' dtype on the CPU (--eval_dtype)
    dtype_reason: str = ""
    quantized_base: bool = False  # a QLoRA run: its adapters are scored on the unquantized base
    generate_every: int = 1  # generation on every k-th checkpoint (by step / save_steps)
    save_steps: float | None = None

    @property
    def eval_dir(self) -> Path:
        return self.run_dir / EVAL_DIR

    @classmethod
    def from_run(cls, run_dir: str, args: EvalArguments | None = None,
                 generation: GenerationOptions | None = None) -> "EvalSetup":
        """The run's resolved config (RUN/sft_config.yaml, read by training's own parser) + the evaluator's flags."""
        run = Path(run_dir)
        config = load_run_config(run)
        args = args or EvalArguments(run=str(run))
        model, data = config.model, config.data
        # Exactly the run's encoding (training's own mapping), with the evaluator's template flags on top.
        encode = replace(encode_options_for(config), template=args.template or model.template,
                         system_prompt=args.system_prompt if args.system_prompt is not None else model.system_prompt)
        val, val_file = _validation_records(config, args, run)
        prompts_file = args.prompts or data.eval_prompts
        if prompts_file:
            prompts = read_prompt_items(_resolve(prompts_file, run))
        else:
            prompts = [_val_prompt(i, conv) for i, conv in val]
            prompts = [p for p in prompts if p is not None]
        prompts = prompts[:args.num_prompts or len(prompts)]
        general_file = args.general or data.general_eval
        general = read_prompt_items(_resolve(general_file, run), default_kind="general") if general_file else []
        dtype, dtype_reason = resolve_eval_dtype(args.eval_dtype)
        save_steps = config.training.save_steps
        return cls(run_dir=run, base_model=args.base_model or model.model,
                   encode=encode, val=val, prompts=prompts, general=general,
                   generation=generation or GenerationOptions(),
                   eval_batch_size=args.eval_batch_size or config.training.per_device_eval_batch_size,
                   include_base=not args.no_base, poll_seconds=args.poll_seconds,
                   sources={"val": val_file, "prompts": prompts_file or (val_file and f"{val_file} (prompts)"),
                            "general": general_file},
                   dtype=dtype, dtype_reason=dtype_reason, quantized_base=config.method.finetuning_type == "qlora",
                   generate_every=args.generate_every,
                   save_steps=float(save_steps) if isinstance(save_steps, (int, float)) else None)


def _validation_records(config: SFTConfig, args: EvalArguments, run: Path) -> tuple[list, str | None]:
    """(validation conversations, where they came from): --val_data, else the run's --val_data / --val_size."""
    data = config.data
    val_file = args.val_data or data.val_data
    fmt = "auto" if args.val_data else data.format  # the run's files are read as training read them
    if val_file:
        val = list(read_conversations(_resolve(val_file, run), fmt))
    elif data.val_size and data.data:
        first = split_weight(str(data.data[0]))[0]
        val = list(read_conversations(_resolve(first, run), fmt, limit=data.val_size))
        val_file = f"{first} (first {data.val_size} records)"
    else:
        val = []
    if args.num_val is not None:
        val = val[:args.num_val]
    return val, val_file


def _resolve(path: str, run: Path) -> str:
    """Paths in sft_config.yaml are relative to where training ran: try there, then the run's parent folders."""
    if os.path.exists(path) or os.path.isabs(path):
        return path
    for parent in [run, *run.resolve().parents]:
        if (parent / path).exists():
            return str(parent / path)
    return path  # the reader's error names it


def read_prompt_items(path: str, default_kind: str = "prompt") -> list[PromptItem]:
    """Eval prompts: {"prompt", "reference"?, "check"?, "kind"?, "system"?} or training-format records."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file {path} not found")
    items = []
    for where, record, conv, reference in read_prompt_records(path):
        check = record.get("check")
        if check is not None and not isinstance(check, dict):
            raise ValueError(f"{where}: \"check\" must be an object such as {{\"contains\": [\"Paris\"]}}")
        if check is not None:
            try:  # at start: a bad key found while scoring would skip every checkpoint and still exit 0
                validate_check(check)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
        items.append(PromptItem(str(record.get("id", os.path.basename(where))), conv, reference, check,
                                str(record.get("kind", default_kind))))
    return items


def _val_prompt(sample_id: str, conv: Conversation) -> PromptItem | None:
    if len(conv.messages) < 2 or conv.messages[-1].role != "assistant":
        return None
    history = Conversation(conv.messages[:-1], system=conv.system, tools=conv.tools)
    return PromptItem(sample_id, history, conv.messages[-1].content, None, str(conv.meta.get("kind", "val")))


# ------------------------------------------------------------------------------------ checkpoints


@dataclass(frozen=True)
class Target:
    step: int
    path: str  # model folder, adapter folder or the base model name
    label: str  # "base", "checkpoint-40", "final"


def checkpoint_targets(run_dir: Path) -> list[Target]:
    """The run's complete checkpoints (sft.train.checkpoints' listing), by step."""
    return [Target(step, str(path), path.name) for step, path in complete_checkpoints(run_dir)]


def final_target(run_dir: Path, end: dict | None) -> Target | None:
    """The run's final model (in run_dir itself), at the step run_end.json records."""
    if not end or not end.get("final_model") or end.get("global_step") is None:
        return None
    return Target(int(end["global_step"]), str(run_dir), "final")


def read_done(eval_dir: Path) -> dict[int, dict]:
    """Evaluated steps -> their metrics line. A line cut by a crash mid-write is ignored (redone)."""
    done: dict[int, dict] = {}
    path = eval_dir / METRICS_NAME
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                done[int(record["step"])] = record
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return done


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------- claims

LOCKS_DIR = "locks"


@dataclass
class Claim:
    """This evaluator's hold on one step: an flock'ed eval/locks/step-N.lock holding {"pid", "host", "time"}."""

    path: Path
    fd: int

    def release(self, finished: bool) -> None:
        """Drop the claim; a finished step's lock file goes (its metrics line says it is done)."""
        if finished:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)  # closing releases the flock


def claim_step(eval_dir: Path, step: int) -> Claim | None:
    """Claim `step` for this evaluator, or None when another running evaluator holds it.

    The kernel's flock is the claim, so the lock of a killed evaluator is free at once (its file, naming the
    dead pid, is simply taken over); the pid and host inside are for people reading the folder. flock is per
    open file, so two evaluators in one process exclude each other too.
    """
    import fcntl
    import socket

    folder = eval_dir / LOCKS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        logger.info("step %d is being evaluated by another evaluator (%s): skipped here", step, _holder(path))
        return None
    previous = _holder(path)
    if previous:
        logger.info("took over the claim on step %d left by %s (no longer running)", step, previous)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": round(time.time(), 3)}
                             ).encode(), 0)
    return Claim(path, fd)


def _holder(path: Path) -> str:
    try:
        record = json.loads(path.read_text(encoding="utf-8") or "{}")
        return f"pid {record['pid']} on {record['host']}" if record else ""
    except (OSError, ValueError, KeyError, TypeError):
        return ""


# -------------------------------------------------------------------------------------- loading


class ModelCache:
    """Keeps the last base model so that adapter checkpoints of one run do not reload it each time.

    dtype: what every model is loaded in (a QLoRA run's base too: unquantized, the CPU has no 4-bit kernels).
    """

    def __init__(self, dtype: str = "float32"):
        self.dtype = dtype
        self.base_path: str | None = None
        self.base = None

    def load(self, path: str, base_model: str):
        """(model, tokenizer, kind) for a full checkpoint, an adapter checkpoint, or a model name.

        An adapter goes on the base it names (full_then_lora: `full_phase/`), else on the run's model.
        """
        kind = "adapter" if is_adapter_dir(path) else "full"
        model, tokenizer = load_for_inference(path, fallback_base=base_model, load_base=self._base, dtype=self.dtype)
        return model, tokenizer, kind

    def release(self, model) -> None:
        """Strip a PEFT wrapper off the cached base (the base weights are unchanged by LoRA).

        A PiSSA/OLoRA checkpoint is the exception: PEFT re-derived its residual base by rewriting the base
        weights in place when it loaded, so that base is dropped, not reused for the next checkpoint.
        """
        configs = getattr(model, "peft_config", {}).values()
        if any(getattr(c, "init_lora_weights", None) in BASE_CHANGING_INITS for c in configs):
            self.base = self.base_path = None
        elif hasattr(model, "unload") and self.base is not None:
            self.base = model.unload()

    def _base(self, base_path: str):
        if self.base_path != base_path:
            self.base, self.base_path = load_model(base_path, dtype=self.dtype), base_path
        return self.base


# ------------------------------------------------------------------------------------- scoring


def masked_loss_sum(model, batches: list[dict]) -> tuple[float, int]:
    """(summed cross-entropy, supervised tokens) over padded batches, with the training loss code (sft.train.loss)."""
    total, count = 0.0, 0
    with torch.inference_mode(), attach_chunked_loss(model):
        for batch in batches:
            labels = batch["labels"]
            outputs = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=labels,
                            num_items_in_batch=1)  # denominator 1: a sum
            total += float(outputs.loss)
            count += int((labels[:, 1:] != -100).sum())
    return total, count


def validation_loss(model, tokenizer, setup: EvalSetup) -> dict[str, float]:
    """Token-weighted mean loss over the validation set with the training encoding and masking."""
    if not setup.val:
        return {}
    batches = build_eval_batches(setup.val, tokenizer, setup.encode, StreamOptions(batch_size=setup.eval_batch_size))
    total, count = masked_loss_sum(model, batches)
    if count == 0:
        return {}
    loss = total / count
    return {"eval_loss": round(loss, 5), "perplexity": round(math.exp(min(loss, 50.0)), 4),
            "eval_tokens": count, "eval_samples": sum(len(b["input_ids"]) for b in batches)}


def generate_for(items: list[PromptItem], model, tokenizer, setup: EvalSetup) -> list[Generated]:
    prompts = [prompt_ids(item.conversation, tokenizer, setup.encode.template, setup.encode.system_prompt)
               for item in items]
    return generate_answers(model, tokenizer, prompts, setup.generation)


def score_items(items: list[PromptItem], answers: list[Generated]) -> tuple[list[dict], dict]:
    """Per-prompt rows (prompt, reference, prediction, scores) and their aggregate (sft.evaluate.metrics)."""
    from sft.evaluate.metrics import aggregate, score_prediction

    scores = [score_prediction(a.text, item.reference, item.check) for item, a in zip(items, answers)]
    rows = [{"id": item.id, "kind": item.kind, "prompt": item.conversation.messages[-1].content,
             "reference": item.reference, "prediction": a.text, "num_tokens": a.num_tokens, "stopped": a.stopped,
             **score} for item, a, score in zip(items, answers, scores)]
    return rows, (aggregate(scores, [item.kind for item in items]) if scores else {})


def evaluate_target(target: Target, setup: EvalSetup, cache: ModelCache) -> dict:
    """Score one model; writes eval/predictions-STEP.jsonl and returns the metrics.jsonl record."""
    started = time.time()
    model, tokenizer, kind = cache.load(target.path, setup.base_model)
    try:
        record: dict[str, Any] = {"step": target.step, "checkpoint": target.label, "model_kind": kind,
                                  "dtype": setup.dtype}
        if kind == "adapter" and setup.quantized_base:
            record["base_weights"] = f"unquantized ({setup.dtype})"  # trained on a 4-bit base, scored without it
        record.update(validation_loss(model, tokenizer, setup))
        gen_started, gen_tokens, predictions = time.time(), 0, []
        generating = should_generate(target, setup)
        if not generating:
            record["generation"] = f"skipped (--generate_every {setup.generate_every})"
        if setup.prompts and generating:
            answers = generate_for(setup.prompts, model, tokenizer, setup)
            rows, summary = score_items(setup.prompts, answers)
            record.update(summary)
            predictions += [{"set": "prompts", **row} for row in rows]
            gen_tokens += sum(a.num_tokens for a in answers)
        if setup.general and generating:
            answers = generate_for(setup.general, model, tokenizer, setup)
            rows, summary = score_items(setup.general, answers)
            record.update({f"general/{key}": value for key, value in summary.items()})
            predictions += [{"set": "general", **row} for row in rows]
            gen_tokens += sum(a.num_tokens for a in answers)
    finally:
        cache.release(model)
    gen_seconds = time.time() - gen_started
    if gen_tokens:
        record["generation_tokens_per_second"] = round(gen_tokens / max(gen_seconds, 1e-9), 1)
    record["eval_seconds"] = round(time.time() - started, 1)
    record["time"] = round(time.time(), 3)
    _write_predictions(setup.eval_dir / f"predictions-{target.step}.jsonl", predictions)
    return record


def should_generate(target: Target, setup: EvalSetup) -> bool:
    """--generate_every k: the base, the final model and every k-th checkpoint (step / save_steps) generate.

    Counted by step, not by position in the folder, so rotation (--save_total_limit) or a restarted
    evaluator picks the same checkpoints.
    """
    if setup.generate_every <= 1 or not target.label.startswith("checkpoint-"):
        return True
    if not setup.save_steps or setup.save_steps < 1:  # a fraction of the run: no fixed spacing
        return True
    number = target.step / setup.save_steps
    return number != int(number) or int(number) % setup.generate_every == 0


def _write_predictions(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


# ----------------------------------------------------------------------------------------- loop


def pending_targets(setup: EvalSetup, done: dict[int, dict], skipped: set[str]) -> list[Target]:
    targets = [Target(BASE_STEP, setup.base_model, "base")] if setup.include_base and setup.base_model else []
    targets += checkpoint_targets(setup.run_dir)
    final = final_target(setup.run_dir, read_run_end(setup.run_dir))
    if final is not None and all(t.step != final.step for t in targets):
        targets.append(final)
    return [t for t in targets if t.step not in done and t.path not in skipped]


def evaluate_run(setup: EvalSetup, watch: bool = False, on_record: Callable[[dict], None] | None = None,
                 max_idle_seconds: float | None = None) -> list[dict]:
    """Evaluate every pending target once; with watch, keep polling until the run has ended.

    Returns the records evaluated by this call. on_record runs after each (report/plot refresh).
    """
    setup.eval_dir.mkdir(parents=True, exist_ok=True)
    cache, skipped, new = ModelCache(setup.dtype), set(), []
    idle_since = time.time()
    while True:
        done = read_done(setup.eval_dir)
        ended = read_run_end(setup.run_dir) is not None  # read BEFORE listing: a checkpoint saved last is still seen
        pending = pending_targets(setup, done, skipped)
        for target in pending:
            claim = claim_step(setup.eval_dir, target.step)
            if claim is None:  # another evaluator has it; its metrics line will show up in `done`
                continue
            finished = False
            try:
                done = read_done(setup.eval_dir)  # it may have finished this step between our listing and claim
                if target.step in done:
                    finished = True
                    continue
                record = _evaluate_or_skip(target, setup, cache, skipped)
                if record is None:
                    continue
                if target.step != BASE_STEP:
                    record.update(forgetting_delta(record, done.get(BASE_STEP)))
                append_jsonl(setup.eval_dir / METRICS_NAME, record)
                finished = True
            finally:
                claim.release(finished)
            new.append(record)
            done[target.step] = record
            logger.info("evaluated %s (step %d) in %.1fs: %s", target.label, target.step, record["eval_seconds"],
                        _headline(record))
            if on_record:
                on_record(record)
        if pending:
            idle_since = time.time()
        if not watch or (ended and not pending_targets(setup, done, skipped)):
            return new
        if max_idle_seconds is not None and time.time() - idle_since > max_idle_seconds:
            logger.warning("no new checkpoint for %.0fs and the run has not ended: stopping the watch", max_idle_seconds)
            return new
        time.sleep(setup.poll_seconds)


def _evaluate_or_skip(target: Target, setup: EvalSetup, cache: ModelCache, skipped: set[str]) -> dict | None:
    """Evaluate, or log and skip a checkpoint that rotation deleted while we were reading it."""
    try:
        return evaluate_target(target, setup, cache)
    except Exception as err:
        gone = target.label.startswith("checkpoint-") and not is_complete_checkpoint(target.path)
        skipped.add(target.path)
        if gone:
            logger.warning("%s was deleted (checkpoint rotation) while being evaluated; skipped", target.label)
            return None
        logger.error("evaluating %s failed: %s: %s", target.label, type(err).__name__, err)
        append_jsonl(setup.eval_dir / ERRORS_NAME, {"step": target.step, "checkpoint": target.label,
                                                     "error": f"{type(err).__name__}: {err}", "time": time.time()})
        if target.step == BASE_STEP or os.environ.get("SFT_DEBUG"):
            raise
        return None


FORGETTING_KEYS = ("general/pass_rate", "general/rouge-l", "general/bleu-4")


def forgetting_delta(record: dict, base: dict | None) -> dict:
    """Change of the general-ability scores against the base model (negative: forgotten)."""
    if not base:
        return {}
    return {f"{key}_delta": round(record[key] - base[key], 4) for key in FORGETTING_KEYS
            if isinstance(record.get(key), (int, float)) and isinstance(base.get(key), (int, float))}


def _headline(record: dict) -> str:
    keys = ("eval_loss", "pass_rate", "rouge-l", "bleu-4", "general/pass_rate")
    return ", ".join(f"{k}={record[k]}" for k in keys if k in record)
