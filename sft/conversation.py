"""The canonical conversation every input format is normalized into.

Shape (what the encoder and the ShareGPT writer consume)::

    Conversation(
        system="You are ...",                 # or None: the template's default applies
        messages=[Message("user", "Hi"),
                  Message("assistant", "", tool_calls=[ToolCall("get_time", {"tz": "UTC"})]),
                  Message("tool", '{"time": "12:00"}'),
                  Message("assistant", "It is noon.")],
        tools=[{"name": "get_time", ...}],    # parsed JSON schemas, kept as given
        meta={"kind": "OpenQA"},              # kind/category/id: passed through, never rendered
    )
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("user", "assistant", "tool")


@dataclass
class ToolCall:
    """One function call made by the assistant; `arguments` is always a JSON object (dict)."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass
class Message:
    """One turn. `train` is the per-message loss flag from the data (None: the default rule)."""

    role: str
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    train: bool | None = None


@dataclass
class Conversation:
    messages: list[Message]
    system: str | None = None
    tools: list[dict[str, Any]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


# The one list of reason codes: a RecordError carries one of these, and so does the "reason" column
# of every rejects file (the builder's and training's). Kept short and stable so that users can grep
# and count them; a code outside this list is a bug (RecordError refuses it).
REASONS = {
    "invalid_json": "the line/element is not valid JSON",
    "invalid_utf8": "the bytes are not valid UTF-8",
    "bom": "the record starts with a UTF-8 byte order mark",
    "not_an_object": "the record is not a JSON object",
    "unknown_format": "no supported format matches the record's keys",
    "missing_field": "a field the format requires is absent",
    "bad_field_type": "a field has the wrong JSON type (e.g. a list where a list of turns was expected)",
    "non_string_content": "a message's content is not a string",
    "unknown_role": "a message has a role the format does not define",
    "misplaced_system": "a system message appears after the first turn, or twice",
    "bad_role_order": "turns are not in user -> assistant [-> tool calls -> tool results] order",
    "no_final_assistant": "the conversation does not end with an assistant answer",
    "empty_conversation": "the conversation has no turns",
    "empty_content": "a message's content is empty or whitespace only",
    "bad_function_call": "a function_call/tool_calls value is unparseable or lacks name/arguments",
    "bad_tools": "the tools value is unparseable or not a list of schemas",
    "bad_loss_flag": "a per-message train/loss/weight flag is not 0/1/true/false",
    "too_long": "the record is longer than --max_chars",
    "mixed_text_and_chat": "plain-text records and conversations cannot share one output file",
    "cannot_render": "training: the chat template cannot render the conversation with this tokenizer",
    "dropped": "training: no trained token is left within --max_length, so the record is skipped",
    "unreadable": "the rest of a file (or a parquet row group) cannot be read: truncated/corrupt compression or pages",
    "too_deep": "the record nests deeper than JSON can be written back (255 levels)",
}


class RecordError(ValueError):
    """One bad record: `reason` is a short code from REASONS, `detail` the human explanation + fix.

    `source`/`line` are filled in by whoever knows where the record came from; str(err) then reads
    ``data.jsonl:12: empty_content: message 1 (assistant) is empty ...``.
    """

    def __init__(self, reason: str, detail: str, source: str | None = None, line: int | None = None):
        if reason not in REASONS:  # a programming error, not bad data: must not be caught as a bad record
            raise RuntimeError(f"RecordError reason {reason!r} is not in sft.conversation.REASONS; use one of its "
                               "codes or add the new one there with its meaning")
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.source = source
        self.line = line

    def located(self, source: str, line: int) -> "RecordError":
        self.source, self.line = source, line
        return self

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}: " if self.source is not None else ""
        return f"{where}{self.reason}: {self.detail}"


# What may follow each role (assistant_tc = an assistant turn that makes tool calls).
_NEXT_ROLES = {
    "user": ("assistant",),
    "assistant": ("user",),
    "assistant_tc": ("tool",),
    "tool": ("tool", "assistant"),
}


# meta key marking a plain-text record ({"text": ...}, continued pre-training): the text is held in a
# single assistant message, every token is trained and no chat template is applied.
PLAIN_TEXT = "plain_text"


def is_plain_text(conv: Conversation) -> bool:
    """True for a {"text": ...} record: one assistant message, trained in full, no chat template."""
    return bool(conv.meta.get(PLAIN_TEXT))


def conversation_chars(conv: Conversation) -> int:
    """Characters of everything that gets rendered (system, tools, contents, tool calls)."""
    n = len(conv.system or "")
    for m in conv.messages:
        n += len(m.content) if type(m.content) is str else 0
        if m.tool_calls:
            n += sum(len(tc.name) + len(repr(tc.arguments)) for tc in m.tool_calls)
    if conv.tools:
        n += len(repr(conv.tools))
    return n


def validate_conversation(conv: Conversation, max_chars: int | None = None) -> None:
    """Raise RecordError if `conv` cannot be trained on as is.

    Rules: turns go user -> assistant (-> user -> assistant ...); an assistant turn with tool_calls
    is followed by one or more tool messages, then an assistant turn; the last turn is an assistant
    answer; every content is a non-empty, non-whitespace string (an assistant turn with tool_calls
    may have empty content); the record is at most `max_chars` characters. A plain-text record
    (see is_plain_text) is one non-empty assistant message.
    """
    msgs = conv.messages
    if not msgs:
        raise RecordError("empty_conversation", "the conversation has no messages; drop the record or add turns")
    system = conv.system
    if system is not None and type(system) is not str:
        raise RecordError("non_string_content", f"system is {type(system).__name__}, expected a string")
    plain = is_plain_text(conv)
    # One pass, no allocations on the common path: this runs for every record of a 1M-row build.
    prev = None  # role state of the previous message ("assistant_tc": assistant that called tools)
    for i, m in enumerate(msgs):
        role, content = m.role, m.content
        if role not in _NEXT_ROLES:
            raise RecordError("unknown_role", f"message {i} has role {role!r}; expected one of {ROLES}")
        if type(content) is not str:
            raise RecordError("non_string_content",
                              f"message {i} ({role}) content is {type(content).__name__}, expected a string")
        if m.tool_calls:
            _check_tool_calls(i, m)
            state = "assistant_tc"
        else:
            if not content or content.isspace():
                raise RecordError("empty_content",
                                  f"message {i} ({role}) is empty or whitespace only; fill it in or drop the record")
            state = role
        if plain:
            pass
        elif prev is None:
            if role != "user":
                raise RecordError("bad_role_order",
                                  f"the first message is {role!r}; a conversation starts with a user turn")
        elif role not in _NEXT_ROLES[prev]:
            raise RecordError("bad_role_order", f"message {i} is {role!r} after {_describe(prev)}; "
                                                f"expected {' or '.join(_NEXT_ROLES[prev])}")
        prev = state
    if plain:
        if len(msgs) != 1 or msgs[0].role != "assistant":
            raise RecordError("bad_role_order", "a plain-text record must hold exactly one assistant message")
    elif prev != "assistant":
        raise RecordError("no_final_assistant",
                          f"the last message is {_describe(prev)}; a training conversation ends with an assistant "
                          "answer (drop the trailing turn or add the answer)")
    if max_chars is not None:
        n = conversation_chars(conv)
        if n > max_chars:
            raise RecordError("too_long", f"the record has {n} characters, over --max_chars={max_chars}; "
                                          "split it, or raise --max_chars")


def _check_tool_calls(i: int, m: Message) -> None:
    if m.role != "assistant":
        raise RecordError("bad_role_order", f"message {i} ({m.role}) has tool_calls; only assistant turns call tools")
    for tc in m.tool_calls:
        if not isinstance(tc.name, str) or not tc.name.strip():
            raise RecordError("bad_function_call", f"message {i}: a tool call has no function name")
        if not isinstance(tc.arguments, dict):
            raise RecordError("bad_function_call",
                              f"message {i}: tool call {tc.name!r} arguments are {type(tc.arguments).__name__}, "
                              "expected a JSON object")


def _describe(state: str) -> str:
    return "an assistant turn with tool_calls" if state == "assistant_tc" else repr(state)
