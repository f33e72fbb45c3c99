"""`hf_sft_eval.py chat`: talk to a trained model (streamed, multi-turn).

    python hf_sft_eval.py chat --model outputs/demo                # streamed, multi-turn; /reset /system /exit

"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Iterator, TextIO

import torch

from sft.config import parse_args
from sft.conversation import Conversation, Message
from sft.evaluate.cli import configure_model_command
from sft.evaluate.inference import (
    Generated,
    GenerationOptions,
    decode_generated,
    generate,
    load_for_inference,
    prompt_ids,
    stop_token_ids,
)
from sft.evaluate.options import ModelChoice

logger = logging.getLogger(__name__)

NO_INPUT = ("hf_sft_eval.py chat: no input on stdin (it is empty or closed): nothing to answer. Run it in a "
            "terminal, or pipe messages in, one a line (e.g. `echo 'Who are you?' | hf_sft_eval.py chat ...`)")
CHAT_HELP = "commands: /reset clears the history, /system TEXT sets the system prompt (and resets), /exit quits"
PROMPT_KEYS = ("prompt", "system", "id", "reference")  # what a {"prompt": ...} record means itself
OUTPUT_KEYS = ("index", "id", "prompt", "answer", "num_tokens", "stopped", "reference")


# ----------------------------------------------------------------------------------------- chat


@dataclass
class ChatSession:
    """What a chat's next prompt is built from: the turns so far and the prompt settings."""

    tokenizer: Any
    template: str = "auto"
    system_prompt: str | None = None
    max_positions: int = 32768  # the model's context; the oldest turns are dropped to stay inside it
    max_new_tokens: int = GenerationOptions.max_new_tokens
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
    input_ids = torch.tensor([ids], device=model.device)
    output = generate(model, tokenizer, input_ids, torch.ones_like(input_ids), options, stops,
                      streamer=_streamer(tokenizer, out))
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
    args, options = parse_args((ModelChoice, GenerationOptions), argv, prog="hf_sft_eval.py chat",
                               description="Chat with a trained model (answers are streamed).")
    if sys.stdin is None or sys.stdin.closed:  # `<&-`: nothing can ever be read; say so before loading a model
        print(NO_INPUT, file=sys.stderr, flush=True)
        return 0
    dtype = configure_model_command("chat", args)
    model, tokenizer = load_for_inference(args.model, base_model=args.base_model, dtype=dtype)
    session = ChatSession(tokenizer, args.template, args.system_prompt, _max_positions(model, tokenizer),
                          options.max_new_tokens)
    chat_prompt(session, "hi")  # a template that cannot render this model's chats fails now, not mid-chat
    if options.do_sample:
        torch.manual_seed(options.seed)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {args.model}. {CHAT_HELP}; Ctrl-D also quits.", flush=True)
    lines = _CountedLines(_terminal_lines("User: ") if interactive else sys.stdin)
    code = run_chat(model, session, options, lines, sys.stdout, sys.stdout if interactive else sys.stderr,
                    interactive)
    if not lines.count and not interactive:  # `</dev/null`, an empty pipe: end cleanly, but not silently
        print(NO_INPUT, file=sys.stderr, flush=True)
    return code


class _CountedLines:
    """The input lines, counting how many were read (none: stdin was empty or closed)."""

    def __init__(self, lines: Iterable[str]):
        self.lines, self.count = lines, 0

    def __iter__(self) -> Iterator[str]:
        for line in self.lines:
            self.count += 1
            yield line


# ---------------------------------------------------------------------------------------- batch


