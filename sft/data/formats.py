"""The one normalizer: every supported record format <-> the canonical Conversation.

    fmt = detect_format(record)              # "firefly", "sharegpt", ...
    conv = to_conversation(record, fmt)      # raises RecordError(reason, detail)
    validate_conversation(conv)              # (sft.conversation) role order, empty content, ...
    conversation_to_sharegpt(conv)           # {"conversations": [{"from": "human", "value": ...}], ...}

    for item in read_conversations("data.jsonl"):   # files -> conversations, with file:line
        item.conversation or item.error

Choices worth knowing:
- Top-level keys a format does not use (Firefly's `kind`, multi-turn `category`/`conversation_id`, any
  `id`/`source`) go to `Conversation.meta` and are written back as is by conversation_to_sharegpt.
- Per-message loss flags `train` / `loss` / `weight` (true/false/0/1) become `Message.train`; the
  ShareGPT writer emits them as `"train": true|false`.
- A plain-text record {"text": ...} becomes one assistant message with meta["plain_text"] = True
  (sft.conversation.PLAIN_TEXT): every token is trained and no chat template applies. It is written
  back as {"text": ...}.
- ShareGPT has no place for text said alongside a function call; it is kept in a "thought" key of the
  function_call turn (LLaMA-Factory ignores unknown keys) so that the round trip stays lossless.
- In prompt-completion records, assistant turns inside the prompt get train=False (loss on the
  completion only) unless they carry their own flag.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import orjson

from sft.conversation import (
    PLAIN_TEXT,
    Conversation,
    Message,
    RecordError,
    ToolCall,
    is_plain_text,
    validate_conversation,
)
from sft.data.json_checks import too_deep_error
from sft.data.sources import RawRecord, iter_raw_records

FORMATS = ("firefly", "firefly_multiturn", "sharegpt", "openai", "alpaca", "prompt_completion", "text")

# The key(s) that identify each format, checked in this order.
_SIGNATURES = (
    ("sharegpt", ("conversations",)),
    ("openai", ("messages",)),
    ("firefly_multiturn", ("conversation",)),
    ("alpaca", ("instruction", "output")),
    ("prompt_completion", ("prompt", "completion")),
    ("firefly", ("input", "target")),
    ("text", ("text",)),
)
_LOSS_KEYS = ("train", "loss", "weight", "loss_weight")  # loss_weight: LLaMA-Factory v1


def detect_format(record: Any) -> str:
    """Name of the format whose identifying keys `record` has; RecordError("unknown_format") if none."""
    if not isinstance(record, dict):
        raise RecordError("not_an_object", f"the record is a JSON {_json_type(record)}, expected an object {{...}}")
    for name, keys in _SIGNATURES:
        if all(k in record for k in keys):
            return name
    raise RecordError("unknown_format",
                      f"cannot tell the format from keys {sorted(record)[:8]}; expected one of: "
                      + "; ".join(f"{n} ({'+'.join(k)})" for n, k in _SIGNATURES) + " (or pass --format)")


def to_conversation(record: Any, fmt: str) -> Conversation:
    """Normalize one record of format `fmt`; raises RecordError naming the field and the fix."""
    if not isinstance(record, dict):
        raise RecordError("not_an_object", f"the record is a JSON {_json_type(record)}, expected an object {{...}}")
    try:
        convert = _CONVERTERS[fmt]
    except KeyError:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}") from None
    return convert(record)


# --------------------------------------------------------------------------------------- readers
def _from_firefly(rec: dict) -> Conversation:
    prompt, answer = _require(rec, "input", "firefly"), _require(rec, "target", "firefly")
    return Conversation([Message("user", prompt), Message("assistant", answer)],
                        meta=_extras(rec, ("input", "target")))


def _from_firefly_multiturn(rec: dict) -> Conversation:
    turns = _require_list(rec, "conversation", "firefly_multiturn")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError("bad_field_type", f"conversation[{i}] is a JSON {_json_type(turn)}, "
                                                "expected {\"human\": ..., \"assistant\": ...}")
        if "human" not in turn:
            raise RecordError("missing_field", f"conversation[{i}] has no 'human' key")
        messages.append(Message("user", turn["human"]))
        if "assistant" in turn:
            messages.append(Message("assistant", turn["assistant"]))
    return Conversation(messages, system=_optional_str(rec, "system"),
                        meta=_extras(rec, ("conversation", "system")))


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "function_call": "function_call", "observation": "tool", "tool": "tool", "system": "system"}


def _from_sharegpt(rec: dict) -> Conversation:
    turns = _require_list(rec, "conversations", "sharegpt")
    system = _optional_str(rec, "system")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError("bad_field_type", f"conversations[{i}] is a JSON {_json_type(turn)}, "
                                                "expected {\"from\": ..., \"value\": ...}")
        tag = turn.get("from", turn.get("role"))
        role = _SHAREGPT_ROLES.get(tag) if isinstance(tag, str) else None
        if role is None:
            raise RecordError("unknown_role", f"conversations[{i}] has from={tag!r}; expected one of "
                                              "human, gpt, function_call, observation, system")
        if "value" not in turn and "content" not in turn:
            raise RecordError("missing_field", f"conversations[{i}] has no 'value'")
        value = turn["value"] if "value" in turn else turn["content"]
        if role == "system":
            system = _leading_system(i, value, system)
            continue
        train = _loss_flag(turn, i)
        if role == "function_call":
            messages.append(Message("assistant", turn.get("thought", ""), _parse_tool_calls(value, i), train))
        else:
            messages.append(Message(role, value, train=train))
    return Conversation(messages, system=system, tools=_parse_tools(rec.get("tools")),
                        meta=_extras(rec, ("conversations", "system", "tools")))


def _from_openai(rec: dict) -> Conversation:
    system, messages = _openai_messages(_require_list(rec, "messages", "openai"), "messages", allow_system=True)
    return Conversation(messages, system=system, tools=_parse_tools(rec.get("tools")),
                        meta=_extras(rec, ("messages", "tools")))


def _openai_messages(items: list, field: str, allow_system: bool) -> tuple[str | None, list[Message]]:
    system, messages = None, []
    for i, m in enumerate(items):
        if not isinstance(m, dict):
            raise RecordError("bad_field_type", f"{field}[{i}] is a JSON {_json_type(m)}, expected "
                                                "{\"role\": ..., \"content\": ...}")
        role, content = m.get("role"), _text_content(m.get("content"), f"{field}[{i}]")
        if role == "system" and allow_system:
            system = _leading_system(i, content, system)
            continue
        if role not in ("user", "assistant", "tool", "function"):
            raise RecordError("unknown_role" if role != "system" else "misplaced_system",
                              f"{field}[{i}] has role={role!r}; expected system (first only), user, assistant, tool")
        calls = m.get("tool_calls") or []
        if calls and role != "assistant":
            raise RecordError("bad_role_order", f"{field}[{i}] ({role}) has tool_calls; only assistant turns call tools")
        tool_calls = _parse_tool_calls(calls, i) if calls else []
        if content is None and tool_calls:
            content = ""
        messages.append(Message("tool" if role == "function" else role, content, tool_calls, _loss_flag(m, i)))
    return system, messages


def _from_alpaca(rec: dict) -> Conversation:
    instruction, output = _require(rec, "instruction", "alpaca"), _require(rec, "output", "alpaca")
    extra = rec.get("input") or ""
    for name, value in (("instruction", instruction), ("input", extra)):
        if not isinstance(value, str):
            raise RecordError("non_string_content", f"'{name}' is a JSON {_json_type(value)}, expected a string")
    messages = []
    history = rec.get("history") or []
    if not isinstance(history, list):
        raise RecordError("bad_field_type", f"'history' is a JSON {_json_type(history)}, expected [[query, answer], ...]")
    for i, pair in enumerate(history):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise RecordError("bad_field_type", f"history[{i}] is not a [query, answer] pair")
        messages += [Message("user", pair[0]), Message("assistant", pair[1])]
    prompt = "\n".join(part for part in (instruction, extra) if part)
    messages += [Message("user", prompt), Message("assistant", output)]
    return Conversation(messages, system=_optional_str(rec, "system"),
                        meta=_extras(rec, ("instruction", "input", "output", "system", "history")))


def _from_prompt_completion(rec: dict) -> Conversation:
    prompt, completion = rec.get("prompt"), rec.get("completion")
    system = None
    if isinstance(prompt, str):
        messages = [Message("user", prompt)]
    elif isinstance(prompt, list):
        system, messages = _openai_messages(prompt, "prompt", allow_system=True)
        for m in messages:  # loss on the completion only
            if m.role == "assistant" and m.train is None:
                m.train = False
    else:
        raise RecordError("non_string_content", f"'prompt' is a JSON {_json_type(prompt)}, expected a string or messages")
    if isinstance(completion, str):
        messages.append(Message("assistant", completion))
    elif isinstance(completion, list):
        messages += _openai_messages(completion, "completion", allow_system=False)[1]
    else:
        raise RecordError("non_string_content",
                          f"'completion' is a JSON {_json_type(completion)}, expected a string or messages")
    return Conversation(messages, system=system, tools=_parse_tools(rec.get("tools")),
                        meta=_extras(rec, ("prompt", "completion", "tools")))


def _from_text(rec: dict) -> Conversation:
    text = _require(rec, "text", "text")
    meta = _extras(rec, ("text",))
    meta[PLAIN_TEXT] = True
    return Conversation([Message("assistant", text)], meta=meta)


_CONVERTERS: dict[str, Callable[[dict], Conversation]] = {
    "firefly": _from_firefly, "firefly_multiturn": _from_firefly_multiturn, "sharegpt": _from_sharegpt,
    "openai": _from_openai, "alpaca": _from_alpaca, "prompt_completion": _from_prompt_completion,
    "text": _from_text,
}


# --------------------------------------------------------------------------------------- helpers
def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _require(rec: dict, key: str, fmt: str) -> Any:
    if key not in rec:
        raise RecordError("missing_field", f"no '{key}' key, which the {fmt} format requires "
                                           f"(record keys: {sorted(rec)[:8]}); fix the record or pass --format")
    return rec[key]


def _require_list(rec: dict, key: str, fmt: str) -> list:
    value = _require(rec, key, fmt)
    if not isinstance(value, list):
        raise RecordError("bad_field_type", f"'{key}' is a JSON {_json_type(value)}, expected an array of turns")
    return value


def _optional_str(rec: dict, key: str) -> str | None:
    value = rec.get(key)
    if value is not None and not isinstance(value, str):
        raise RecordError("non_string_content", f"'{key}' is a JSON {_json_type(value)}, expected a string")
    return value


def _extras(rec: dict, used: tuple[str, ...]) -> dict:
    return {k: v for k, v in rec.items() if k not in used}


def _leading_system(i: int, value: Any, current: str | None) -> str:
    if i != 0 or current is not None:
        raise RecordError("misplaced_system", f"turn {i} is a system message, but a system prompt may only be "
                                              "the first turn (or the 'system' field), once; merge or remove it")
    if not isinstance(value, str):
        raise RecordError("non_string_content", f"the system message is a JSON {_json_type(value)}, expected a string")
    return value


def _text_content(content: Any, where: str) -> Any:
    """Content may be a list of text parts, {"type": "text", "text": ...} (OpenAI) or {"type": "text",
    "value": ...} (LLaMA-Factory v1): join them; else as is."""
    if isinstance(content, list):
        texts = [_part_text(p) for p in content]
        if all(text is not None for text in texts):
            return "".join(texts)
        kinds = sorted({str(p.get("type")) if isinstance(p, dict) else _json_type(p) for p, text in zip(content, texts)
                        if text is None})
        raise RecordError("non_string_content", f"{where} content has non-text parts ({', '.join(kinds)}); only "
                                                'text parts ({"type": "text", "text" or "value": "..."}) are supported')
    return content


def _part_text(part: Any) -> str | None:
    if not isinstance(part, dict) or part.get("type", "text") != "text":
        return None
    text = part.get("text", part.get("value"))
    return text if isinstance(text, str) else None


def _loss_flag(turn: dict, i: int) -> bool | None:
    for key in _LOSS_KEYS:
        if key in turn:
            value = turn[key]
            if value in (0, 1) and not isinstance(value, str):  # True/False/0/1/0.0/1.0
                return bool(value)
            raise RecordError("bad_loss_flag", f"turn {i} has {key}={value!r}; expected true/false or 0/1 (0: the "
                                               "turn is not trained, 1: it is; weighted losses are not supported)")
    return None


def _parse_tool_calls(value: Any, i: int) -> list[ToolCall]:
    """ShareGPT function_call value (JSON string of one call or a list) or OpenAI tool_calls -> ToolCalls."""
    if isinstance(value, str):
        value = _loads(value, "bad_function_call", f"turn {i}: the function_call value is not valid JSON",
                       "; expected '{\"name\": ..., \"arguments\": {...}}'")
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise RecordError("bad_function_call", f"turn {i}: the function call list is empty")
    return [_parse_one_call(c, i) for c in calls]


def _parse_one_call(call: Any, i: int) -> ToolCall:
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        call = call["function"]  # OpenAI {"type": "function", "function": {...}}
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise RecordError("bad_function_call", f"turn {i}: a function call is not an object with a string 'name'")
    args = call.get("arguments", {})
    if isinstance(args, str):
        args = _loads(args, "bad_function_call", f"turn {i}: arguments of {call['name']!r} are not valid JSON") \
            if args.strip() else {}
    if not isinstance(args, dict):
        raise RecordError("bad_function_call", f"turn {i}: arguments of {call['name']!r} are a JSON "
                                               f"{_json_type(args)}, expected an object")
    return ToolCall(call["name"], args)


def _loads(text: str, reason: str, what: str, fix: str = "") -> Any:
    """Parse JSON text held in a field, or raise RecordError "<what> (<parser error>)<fix>"."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise RecordError(reason, f"{what} ({e}){fix}") from None


def _parse_tools(value: Any) -> list[dict] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = _loads(value, "bad_tools", "'tools' is not valid JSON", "; expected a JSON list of function schemas")
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise RecordError("bad_tools", "'tools' must be a list of function schema objects")
    return value


# --------------------------------------------------------------------------------------- writer
def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def conversation_to_sharegpt(conv: Conversation) -> dict:
    """Canonical -> ShareGPT as LLaMA-Factory reads it (plain text -> {"text": ...})."""
    if is_plain_text(conv):
        out = {"text": conv.messages[0].content}
    else:
        turns = []
        for m in conv.messages:
            if m.tool_calls:
                calls = [{"name": c.name, "arguments": c.arguments} for c in m.tool_calls]
                turn = {"from": "function_call", "value": _dump(calls[0] if len(calls) == 1 else calls)}
                if m.content:
                    turn["thought"] = m.content
            else:
                turn = {"from": _SHAREGPT_TAGS[m.role], "value": m.content}
            if m.train is not None:
                turn["train"] = m.train
            turns.append(turn)
        out = {"conversations": turns}
        if conv.system is not None:
            out["system"] = conv.system
        if conv.tools is not None:
            out["tools"] = _dump(conv.tools)
    for key, value in conv.meta.items():
        if key != PLAIN_TEXT and key not in out:
            out[key] = value
    return out


_SHAREGPT_TAGS = {"user": "human", "assistant": "gpt", "tool": "observation"}


# --------------------------------------------------------------------------------------- files
@dataclass(slots=True)
class LoadedRecord:
    """One input record after normalization: `conversation` or a located `error`, never both."""

    raw: RawRecord
    conversation: Conversation | None
    error: RecordError | None
    fmt: str | None


def read_conversations(path: str, fmt: str | None = None, max_chars: int | None = None,
                       **source_kw: Any) -> Iterator[LoadedRecord]:
    """Every record of `path` (local file or hub id) normalized and validated, with source:line.

    The format is detected once per file from its first recognizable record unless `fmt` forces one.
    Bad records come back as items with `error` set (RecordError with .source/.line/.reason); raise
    them (`raise item.error`) or count and skip them. `source_kw`: hub_split, hub_config.
    """
    return normalize_records(iter_raw_records(path, **source_kw), fmt, max_chars)


def normalize_records(raws: Iterable[RawRecord], fmt: str | None = None, max_chars: int | None = None,
                      detected: dict[str, str] | None = None) -> Iterator[LoadedRecord]:
    """read_conversations over any RawRecord stream (several files, shuffled). `detected` receives
    {source: format} as formats are detected."""
    formats = {} if detected is None else detected
    for raw in raws:
        if raw.error is not None:
            yield LoadedRecord(raw, None, raw.error.located(raw.source, raw.line), None)
            continue
        file_fmt = fmt or formats.get(raw.source)
        try:
            if file_fmt is None:
                file_fmt = formats[raw.source] = detect_format(raw.data)
            conv = to_conversation(raw.data, file_fmt)
            validate_conversation(conv, max_chars)
        except RecordError as e:
            if e.reason == "missing_field" and fmt is None:
                e.detail += f" [format '{file_fmt}' was detected from the first record of {raw.source}]"
            yield LoadedRecord(raw, None, e.located(raw.source, raw.line), file_fmt)
            continue
        except RecursionError as e:  # tools/arguments nested ~1000 levels (orjson reads up to 1024)
            yield LoadedRecord(raw, None, too_deep_error(raw.data, e).located(raw.source, raw.line), file_fmt)
            continue
        yield LoadedRecord(raw, conv, None, file_fmt)
