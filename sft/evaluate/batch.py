"""`hf_sft_eval.py batch`: answer a file of prompts, resumably.

    python hf_sft_eval.py batch --model outputs/demo --input prompts.jsonl --output answers.jsonl

batch input, one JSON object a line (blank lines are skipped; `index` counts records, not lines):
    {"prompt": "...", "system"?: "...", "id"?: ..., "reference"?: "...", <other fields: copied to the output>}
    or a training-format record (sft.data.formats): its last assistant turn becomes the "reference".
batch output, one line per input record, in input order:
    {"index": 0, "id": null, "prompt": "...", "answer": "...", "num_tokens": 12, "stopped": true,
     "reference"?: "...", <passed-through fields>}

The output is appended and fsync'ed after every batch, so an interrupted run picks up where it stopped:
the existing output must be a prefix of what this input produces (a torn last line is cut off), made with the
same model and generation settings (recorded in OUTPUT.settings.json; a resume with others is refused).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft.config import parse_args
from sft.conversation import PLAIN_TEXT, Conversation
from sft.evaluate.chat import OUTPUT_KEYS, PROMPT_KEYS
from sft.evaluate.cli import configure_model_command
from sft.evaluate.inference import (
    Generated,
    GenerationOptions,
    generate_answers,
    load_for_inference,
    prompt_ids,
    read_prompt_records,
)
from sft.evaluate.options import BatchFiles, ModelChoice
from sft.files import write_text_atomic

logger = logging.getLogger(__name__)

@dataclass
class BatchItem:
    """One input record: where it came from, what to answer, and the output fields known in advance."""

    where: str  # "prompts.jsonl:12"
    conversation: Conversation
    fields: dict[str, Any]  # index, id, prompt, reference?, passed-through fields


def read_batch_input(path: str) -> list[BatchItem]:
    """Parse every line of a batch input file; the first bad line raises ValueError naming file:line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--input {path} does not exist; pass a JSONL file of {{\"prompt\": ...}} lines")
    items: list[BatchItem] = []
    for where, record, conv, reference in read_prompt_records(path):
        items.append(_batch_item(where, record, conv, reference, len(items)))
    return items


def _batch_item(where: str, record: dict, conv: Conversation, reference: str | None, index: int) -> BatchItem:
    prompt = next((m.content for m in reversed(conv.messages) if m.role == "user"), conv.messages[-1].content)
    fields: dict[str, Any] = {"index": index, "id": record.get("id"), "prompt": prompt}
    if reference is not None:
        fields["reference"] = reference
    fields.update((k, v) for k, v in _passthrough(record, conv).items() if k not in OUTPUT_KEYS)
    return BatchItem(where, conv, fields)


def _passthrough(record: dict, conv: Conversation) -> dict:
    """Fields of the input record that are not part of the prompt: copied to the output line."""
    if isinstance(record.get("prompt"), str) and "completion" not in record:
        return {k: v for k, v in record.items() if k not in PROMPT_KEYS}
    return {k: v for k, v in conv.meta.items() if k != PLAIN_TEXT}


def finished_prefix(output: str, items: list[BatchItem]) -> int:
    """How many items `output` already holds; checks they match the input and cuts off a torn last line."""
    if not os.path.exists(output):
        return 0
    data = Path(output).read_bytes()
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline
    if not torn and lines and not _parses(lines[-1]):
        torn = lines.pop() + b"\n"
    if torn:  # killed mid-write
        logger.warning("%s: the last line is incomplete (%d bytes); cut it off, it is redone", output, len(torn))
        with open(output, "r+b") as f:
            f.truncate(len(data) - len(torn))
            os.fsync(f.fileno())
    for k, raw in enumerate(lines):
        if k >= len(items):
            problem = f"it has more lines ({len(lines)}) than the input has records ({len(items)})"
        elif not _parses(raw):
            problem = f"line {k + 1} is not valid JSON"
        elif not _same_record(json.loads(raw), items[k].fields):
            problem = (f"line {k + 1} is not the answer to record {k} ({items[k].where}, prompt "
                       f"{_clip(items[k].fields['prompt'])})")
        else:
            continue
        raise ValueError(f"--output {output} does not continue this input: {problem}. Delete {output} "
                         "or pass another --output")
    return len(lines)


def _parses(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except ValueError:
        return False
    return True


def _same_record(done: Any, fields: dict) -> bool:
    return isinstance(done, dict) and all(done.get(key) == fields[key] for key in ("index", "id", "prompt"))


def _clip(text: str, width: int = 60) -> str:
    return repr(text if len(text) <= width else text[:width] + "...")


SETTINGS_SUFFIX = ".settings.json"


def batch_settings(args: ModelChoice, options: GenerationOptions, dtype: str = "float32") -> dict[str, Any]:
    """What the answers depend on, as flags: a resume must use the same (batch_size only regroups prompts).

    dtype: the resolved --eval_dtype (what `auto` became on this machine), not the flag as given.
    """
    def where(name: str | None) -> str | None:  # one model, however its folder is spelled
        return os.path.realpath(name) if name and os.path.exists(name) else name

    settings: dict[str, Any] = {"model": where(args.model), "base_model": where(args.base_model),
                                "eval_dtype": dtype, "template": args.template,
                                "system_prompt": args.system_prompt, "max_new_tokens": options.max_new_tokens,
                                "do_sample": options.do_sample}
    if options.do_sample:  # greedy answers do not depend on these
        settings.update(temperature=options.temperature, top_p=options.top_p, seed=options.seed)
    return settings


def check_settings(output: str, settings: dict[str, Any]) -> None:
    """Refuse to append to an output made with other settings; record them beside a new output (OUTPUT.settings.json).

    An output without a settings file (written before they were recorded) is resumed as before, and gets one.
    """
    path = Path(output + SETTINGS_SUFFIX)
    if os.path.exists(output) and os.path.getsize(output) and path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: not readable ({err}); it records the settings of {output}. Delete both "
                             "files to start afresh, or pass another --output") from None
        if not isinstance(stored, dict):
            raise ValueError(f"{path}: expected a JSON object of settings, found {type(stored).__name__}; it records "
                             f"the settings of {output}. Delete both files to start afresh, or pass another --output")
        stored.setdefault("eval_dtype", "float32")  # recorded before --eval_dtype: every model loaded in fp32
        changed = [f"--{key} {_flag_value(settings.get(key))} (the output was made with "
                   f"{_flag_value(stored.get(key))})" for key in sorted(set(stored) | set(settings))
                   if stored.get(key) != settings.get(key)]
        if changed:
            raise ValueError(f"--output {output} was made with other settings, so resuming would mix answers: "
                             f"{'; '.join(changed)}. Rerun with the settings it was made with (they are in {path}), "
                             "or pass a new --output")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(settings, indent=1, ensure_ascii=False) + "\n")


def _flag_value(value: Any) -> str:
    return "(not set)" if value is None else json.dumps(value, ensure_ascii=False)


@dataclass
class BatchStats:
    answered: int = 0
    skipped: int = 0
    tokens: int = 0
    seconds: float = 0.0


def run_batch(model, tokenizer, items: list[BatchItem], output: str, options: GenerationOptions,
              template: str = "auto", system_prompt: str | None = None, start: int = 0) -> BatchStats:
    """Answer items[start:] in batches of options.batch_size, appending each batch to `output`."""
    from tqdm import tqdm

    stats = BatchStats(skipped=start)
    todo = items[start:]
    prompts = [_located_prompt_ids(item, tokenizer, template, system_prompt) for item in todo]
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with open(output, "a", encoding="utf-8") as f, tqdm(total=len(items), initial=start, unit="line",
                                                        desc="batch") as bar:
        for begin in range(0, len(todo), options.batch_size):
            chunk = slice(begin, begin + options.batch_size)
            clock = time.perf_counter()
            answers = generate_answers(model, tokenizer, prompts[chunk], options)
            stats.seconds += time.perf_counter() - clock
            for item, answer in zip(todo[chunk], answers):
                f.write(json.dumps(_output_record(item, answer), ensure_ascii=False) + "\n")
                stats.answered += 1
                stats.tokens += answer.num_tokens
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(answers))
    return stats


def _located_prompt_ids(item: BatchItem, tokenizer, template: str, system_prompt: str | None) -> list[int]:
    try:
        return prompt_ids(item.conversation, tokenizer, template, system_prompt)
    except ValueError as err:
        raise ValueError(f"{item.where}: {err}") from err


def _output_record(item: BatchItem, answer: Generated) -> dict:
    record = {key: item.fields[key] for key in ("index", "id", "prompt")}
    record.update(answer=answer.text, num_tokens=answer.num_tokens, stopped=answer.stopped)
    record.update((k, v) for k, v in item.fields.items() if k not in record)
    return record


def batch_main(argv: list[str]) -> int:
    """Answer every prompt of --input into --output (JSONL, input order, resumable)."""
    args, files, options = parse_args((ModelChoice, BatchFiles, GenerationOptions), argv, prog="hf_sft_eval.py batch",
                                      description="Answer a JSONL file of prompts (resumable).")
    dtype = configure_model_command("batch", args)
    items = read_batch_input(files.input)
    check_settings(files.output, batch_settings(args, options, dtype))
    start = finished_prefix(files.output, items)
    stats = BatchStats(skipped=start)
    if start < len(items):
        model, tokenizer = load_for_inference(args.model, base_model=args.base_model, dtype=dtype)
        stats = run_batch(model, tokenizer, items, files.output, options, args.template, args.system_prompt, start)
    speed = f"{stats.tokens / stats.seconds:.1f} tokens/s" if stats.seconds else "no generation"
    print(f"batch: {stats.answered} answered, {stats.skipped} skipped as already done, {stats.tokens} tokens "
          f"in {stats.seconds:.1f}s ({speed}) -> {files.output}", flush=True)
    return 0
