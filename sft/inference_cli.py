"""`hf_sft_eval.py chat` and `hf_sft_eval.py batch`: talk to a trained model, or answer a file of prompts.

    python hf_sft_eval.py chat --model outputs/demo                # streamed, multi-turn; /reset /system /exit
    python hf_sft_eval.py batch --model outputs/demo --input prompts.jsonl --output answers.jsonl

batch input, one JSON object a line (blank lines are skipped; `index` counts records, not lines):
    {"prompt": "...", "system"?: "...", "id"?: ..., "reference"?: "...", <other fields: copied to the output>}
    or a training-format record (sft.formats): its last assistant turn becomes the "reference".
batch output, one line per input record, in input order:
    {"index": 0, "id": null, "prompt": "...", "answer": "...", "num_tokens": 12, "stopped": true,
     "reference"?: "...", <passed-through fields>}

The output is appended and fsync'ed after every batch, so an interrupted run picks up where it stopped:
the existing output must be a prefix of what this input produces (a torn last line is cut off).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, TextIO

import torch

from .conversation import PLAIN_TEXT, Conversation, Message
from .generation import (GenerationOptions, Generated, decode_generated, generate_answers, load_for_inference,
                         prompt_ids, read_prompt_records, stop_token_ids)
from .template import TEMPLATES

logger = logging.getLogger(__name__)

CHAT_HELP = "commands: /reset clears the history, /system TEXT sets the system prompt (and resets), /exit quits"
PROMPT_KEYS = ("prompt", "system", "id", "reference")  # what a {"prompt": ...} record means itself
OUTPUT_KEYS = ("index", "id", "prompt", "answer", "num_tokens", "stopped", "reference")


# ------------------------------------------------------------------------------------ arguments


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--model", required=True, help="model folder, built-in name, hub id or adapter folder")
    parser.add_argument("--base_model", default=None, help="base model of an adapter (when its recorded base moved)")
    parser.add_argument("--template", default="auto", choices=TEMPLATES, help="chat template (as in training)")
    parser.add_argument("--system_prompt", default=None, help="system prompt text or a preset name (qwen, firefly)")
    parser.add_argument("--max_new_tokens", type=int, default=512, help="longest answer, in tokens")
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=GenerationOptions.temperature,
                        help="sampling temperature (with --do_sample)")
    parser.add_argument("--top_p", type=float, default=GenerationOptions.top_p,
                        help="nucleus sampling mass (with --do_sample)")
    parser.add_argument("--seed", type=int, default=GenerationOptions.seed, help="random seed for sampling")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    problems = [f"--{name} must be at least 1 (got {getattr(args, name)})"
                for name in ("max_new_tokens", "batch_size", "threads")
                if getattr(args, name, None) is not None and getattr(args, name) < 1]
    if args.do_sample and not (args.temperature > 0 and 0 < args.top_p <= 1):
        problems.append("with --do_sample, --temperature must be > 0 and --top_p in (0, 1]")
    if problems:
        raise ValueError("; ".join(problems))


def _generation_options(args: argparse.Namespace) -> GenerationOptions:
    return GenerationOptions(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                             temperature=args.temperature, top_p=args.top_p,
                             batch_size=getattr(args, "batch_size", 1), seed=args.seed)


# ----------------------------------------------------------------------------------------- chat


@dataclass
class ChatSession:
    """What a chat's next prompt is built from: the turns so far and the prompt settings."""

    tokenizer: Any
    template: str = "auto"
    system_prompt: str | None = None
    max_positions: int = 32768  # the model's context; the oldest turns are dropped to stay inside it
    max_new_tokens: int = 512
    history: list[Message] = field(default_factory=list)  # user, assistant, user, assistant, ...
    dropped_turns: int = 0


def chat_prompt(session: ChatSession, user_text: str) -> tuple[list[int], int]:
    """(prompt ids for history + `user_text`, new-token budget), dropping the oldest turns that do not fit.

    The budget is --max_new_tokens, cut to what is left of the context when even the new turn alone
    would not leave room for it.
    """
    while True:
        conv = Conversation([*session.history, Message("user", user_text)])
        ids = prompt_ids(conv, session.tokenizer, session.template, session.system_prompt)
        if len(ids) + session.max_new_tokens <= session.max_positions or not session.history:
            break
        if session.dropped_turns == 0:
            logger.warning("the chat is longer than the model's %d positions: dropping the oldest turns "
                           "(said once; /reset starts afresh)", session.max_positions)
        del session.history[:2]  # one user turn and its answer
        session.dropped_turns += 1
    room = session.max_positions - len(ids)
    if room < 1:
        raise ValueError(f"that message is {len(ids)} tokens with the template, more than the model's "
                         f"{session.max_positions} positions; send a shorter one")
    return ids, min(session.max_new_tokens, room)


def chat_command(session: ChatSession, line: str) -> str | None:
    """Apply a /command to the session and return its confirmation; None for a line that is a message."""
    command, _, rest = line.partition(" ")
    if command == "/reset":
        session.history.clear()
        return "(history cleared)"
    if command == "/system":
        session.system_prompt = rest.strip() or None
        session.history.clear()
        shown = "the template's default" if session.system_prompt is None else repr(session.system_prompt)
        return f"(system prompt set to {shown}; history cleared)"
    if command[:1] == "/" and command[1:].isalpha():  # "/usr/bin ..." is a message, "/rest" a typo
        return f"(unknown command {command}; {CHAT_HELP})"
    return None


def _streamer(tokenizer, out: TextIO):
    """A TextStreamer (prompt skipped) that writes to `out`; TextStreamer itself always prints to stdout."""
    from transformers import TextStreamer

    def write(text: str, stream_end: bool = False) -> None:
        out.write(text + ("\n" if stream_end else ""))
        out.flush()

    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    streamer.on_finalized_text = write  # type: ignore[method-assign]
    return streamer


@torch.inference_mode()
def stream_reply(model, tokenizer, ids: list[int], options: GenerationOptions, out: TextIO) -> Generated:
    """Generate one answer for one prompt (KV cache, no padding), writing its text to `out` as it comes."""
    stops = stop_token_ids(tokenizer)
    sampling = dict(temperature=options.temperature, top_p=options.top_p) if options.do_sample else {}
    input_ids = torch.tensor([ids], device=model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                            max_new_tokens=options.max_new_tokens, do_sample=options.do_sample,
                            eos_token_id=stops, pad_token_id=pad, use_cache=True, top_k=None,
                            streamer=_streamer(tokenizer, out), **sampling)
    return decode_generated(output[0, len(ids):].tolist(), tokenizer, stops)


def run_chat(model, session: ChatSession, options: GenerationOptions, lines: Iterable[str],
             out: TextIO, notes: TextIO, interactive: bool = False) -> int:
    """The chat loop over input `lines`: answers go to `out`, confirmations and errors to `notes`."""
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        confirmation = chat_command(session, line)
        if confirmation is not None:
            print(confirmation, file=notes, flush=True)
            continue
        try:
            ids, budget = chat_prompt(session, line)
        except ValueError as err:
            print(f"error: {err}", file=notes, flush=True)
            continue
        if interactive:
            out.write("Assistant: ")
        try:
            reply = stream_reply(model, session.tokenizer, ids, replace(options, max_new_tokens=budget), out)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
            print("\n(interrupted; this turn is not kept)", file=notes, flush=True)
            continue
        if reply.text:  # an empty answer would render as an empty assistant turn: keep neither side
            session.history += [Message("user", line), Message("assistant", reply.text)]
    return 0


def _terminal_lines(prompt: str) -> Iterator[str]:
    while True:
        try:
            yield input(prompt)
        except EOFError:
            print()
            return


def _max_positions(model, tokenizer) -> int:
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 10**7]  # tokenizers say 1e30 for "unknown"
    return min(limits) if limits else 2048


def chat_main(argv: list[str]) -> int:
    """Interactive chat with a trained model; scriptable when stdin is not a terminal (answers only)."""
    args = _parser("hf_sft_eval.py chat", "Chat with a trained model (answers are streamed).").parse_args(argv)
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_for_inference(args.model, base_model=args.base_model)
    options = _generation_options(args)
    session = ChatSession(tokenizer, args.template, args.system_prompt, _max_positions(model, tokenizer),
                          args.max_new_tokens)
    chat_prompt(session, "hi")  # a template that cannot render this model's chats fails now, not mid-chat
    if args.do_sample:
        torch.manual_seed(args.seed)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {args.model}. {CHAT_HELP}; Ctrl-D also quits.", flush=True)
    lines = _terminal_lines("User: ") if interactive else sys.stdin
    return run_chat(model, session, options, lines, sys.stdout, sys.stdout if interactive else sys.stderr,
                    interactive)


# ---------------------------------------------------------------------------------------- batch


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
    parser = _parser("hf_sft_eval.py batch", "Answer a JSONL file of prompts (resumable).")
    parser.add_argument("--input", required=True, help="JSONL: {\"prompt\": ...} lines or training-format records")
    parser.add_argument("--output", required=True, help="JSONL answers; an existing file is resumed")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts generated together")
    args = parser.parse_args(argv)
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if os.path.abspath(args.input) == os.path.abspath(args.output):
        raise ValueError(f"--output {args.output} is the --input file; pass another --output path")
    items = read_batch_input(args.input)
    start = finished_prefix(args.output, items)
    stats = BatchStats(skipped=start)
    if start < len(items):
        model, tokenizer = load_for_inference(args.model, base_model=args.base_model)
        stats = run_batch(model, tokenizer, items, args.output, _generation_options(args), args.template,
                          args.system_prompt, start)
    speed = f"{stats.tokens / stats.seconds:.1f} tokens/s" if stats.seconds else "no generation"
    print(f"batch: {stats.answered} answered, {stats.skipped} skipped as already done, {stats.tokens} tokens "
          f"in {stats.seconds:.1f}s ({speed}) -> {args.output}", flush=True)
    return 0
