"""Render a Conversation into segments: text pieces flagged as part of an assistant answer or not.

    segments = render_segments(conv, tokenizer, template="auto", system_prompt=None)
    # [Segment("<|im_start|>", special=True), Segment("system\\nYou are ...", ...),
    #  Segment("<|im_end|>", special=True), Segment("\\n"), ...,
    #  Segment("assistant\\n", message_index=1),                  # generation prompt: not an answer
    #  Segment("Hello!", answer=True, message_index=1),           # answer content
    #  Segment("<|im_end|>", special=True, answer=True, message_index=1), Segment("\\n", ...)]

The encoder (sft.tokens.encoding) tokenizes every segment on its own, so segment boundaries are placed only
where inference also has a tokenization boundary: around structural special tokens (the tokenizer
splits the text there anyway) and right after the generation prompt `<|im_start|>assistant\\n`
(the model generates its answer after that prompt, so the answer never merges with it).

Templates (`--template`):
    qwen2.5    Qwen2.5-Instruct's ChatML in Python (REFERENCE §2), tools included. Default system
               prompt "You are Qwen, created by Alibaba Cloud. ..." unless --system_prompt says
               otherwise (`--system_prompt firefly` selects Firefly's "You are a helpful assistant.").
    chatml     the same structure; the default system prompt is --system_prompt, else the one the
               tokenizer's own template inserts (SmolLM2: "You are a helpful AI assistant named
               SmolLM, ..."), else no system block.
    tokenizer  the tokenizer's own Jinja `chat_template`; assistant answers are located by rendering
               growing prefixes (each must be a prefix of the full render) and generation prompts.
    auto       (default) qwen2.5 for a Qwen2.5 tokenizer; otherwise the tokenizer's template when it
               can be segmented; otherwise a ValueError that suggests --template chatml.

A record's own system prompt always wins; --system_prompt is the default for records without one.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from sft.chat_templates import (
    FIREFLY_DEFAULT_SYSTEM,
    QWEN25_DEFAULT_SYSTEM,
    QWEN25_TEMPLATE,
    TEMPLATES,
    TURN_END_TOKENS,
)
from sft.conversation import Conversation, Message

SYSTEM_PRESETS = {"qwen": QWEN25_DEFAULT_SYSTEM, "firefly": FIREFLY_DEFAULT_SYSTEM}

_TOOLS_HEADER = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call>"
)


@dataclass(frozen=True)
class Segment:
    """One piece of the rendered conversation.

    special: the text is one structural special token (encoded by id; content never is).
    answer: part of an assistant answer (content + turn end): trained by the default rule.
    message_index: index into conv.messages; None for the system block.
    """

    text: str
    special: bool = False
    answer: bool = False
    message_index: int | None = None


def resolve_system_prompt(system_prompt: str | None) -> str | None:
    """A preset name ("qwen", "firefly") -> its text; any other string is the prompt itself."""
    if system_prompt is None:
        return None
    return SYSTEM_PRESETS.get(system_prompt, system_prompt)


def render_segments(conv: Conversation, tokenizer, template: str = "auto",
                    system_prompt: str | None = None) -> list[Segment]:
    """Render `conv` with the named template (see the module doc) into segments."""
    name = resolve_template(template, tokenizer)
    default_system = resolve_system_prompt(system_prompt)
    if name == "qwen2.5":
        return render_chatml(conv, default_system or QWEN25_DEFAULT_SYSTEM)
    if name == "chatml":
        return render_chatml(conv, default_system or template_default_system(tokenizer))
    return render_with_tokenizer(conv, tokenizer, default_system)


def render_text(segments: list[Segment]) -> str:
    return "".join(s.text for s in segments)


# ------------------------------------------------------------------------------ ChatML in Python


def render_chatml(conv: Conversation, default_system: str | None) -> list[Segment]:
    """Qwen2.5-style ChatML (REFERENCE §2). No system block when neither conv nor default has one."""
    out: list[Segment] = []
    system = conv.system if conv.system is not None else default_system
    if system is not None or conv.tools:
        body = system or ""
        if conv.tools:
            body += _TOOLS_HEADER + "".join("\n" + _dumps(_wrap_tool(t)) for t in conv.tools) + _TOOLS_FOOTER
        _block(out, "system\n" + body, None)
    msgs = conv.messages
    for i, m in enumerate(msgs):
        _check_message(m, i)
        if m.role == "user":
            _block(out, "user\n" + m.content, i)
        elif m.role == "tool":
            if i > 0 and msgs[i - 1].role == "tool":
                continue  # rendered with the first tool message of its group
            group = []
            for m2 in msgs[i:]:
                if m2.role != "tool":
                    break
                group.append(m2)
            _block(out, "user" + "".join(f"\n<tool_response>\n{t.content}\n</tool_response>" for t in group), i)
        else:
            out.append(Segment("<|im_start|>", special=True, message_index=i))
            out.append(Segment("assistant\n", message_index=i))
            out.append(Segment(_assistant_body(m, i), answer=True, message_index=i))
            out.append(Segment("<|im_end|>", special=True, answer=True, message_index=i))
            out.append(Segment("\n", message_index=i))
    return [s for s in out if s.text]


def _block(out: list[Segment], text: str, index: int | None) -> None:
    out += [Segment("<|im_start|>", special=True, message_index=index), Segment(text, message_index=index),
            Segment("<|im_end|>", special=True, message_index=index), Segment("\n", message_index=index)]


def _assistant_body(m: Message, index: int) -> str:
    # Qwen renders "assistant" + ("\n" + content) + "\n<tool_call>..." per call; with at least one call
    # that string always starts with "\n", which here belongs to the generation prompt "assistant\n".
    if not m.tool_calls:
        return m.content
    calls = [
        f'<tool_call>\n{{"name": "{tc.name}", "arguments": {_dumps(_tool_arguments(tc.arguments, index))}}}\n</tool_call>'
        for tc in m.tool_calls
    ]
    return (m.content + "\n" if m.content else "") + "\n".join(calls)


def _tool_arguments(arguments: Any, index: int) -> dict:
    # Canonical arguments are a dict; a JSON string is parsed so that it is not double-encoded.
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as err:
            raise ValueError(f"message {index}: tool call arguments are not valid JSON ({err}); "
                             "store them as a JSON object") from err
    if not isinstance(arguments, dict):
        raise ValueError(f"message {index}: tool call arguments are {type(arguments).__name__}, "
                         "expected a JSON object")
    return arguments


def _check_message(m: Message, index: int) -> None:
    if m.role not in ("user", "assistant", "tool"):
        raise ValueError(f"message {index} has role {m.role!r}; expected user, assistant or tool "
                         "(map ShareGPT's human/gpt/observation roles with sft.data.formats)")
    if m.tool_calls and m.role != "assistant":
        raise ValueError(f"message {index} ({m.role}) has tool_calls; only assistant turns call tools")


def _wrap_tool(tool: dict) -> dict:
    return tool if "function" in tool else {"type": "function", "function": tool}


def _dumps(obj: Any) -> str:
    # The same as the chat template's tojson: ", " / ": " separators, non-ASCII kept raw.
    return json.dumps(obj, ensure_ascii=False)


# ------------------------------------------------------------------- the tokenizer's chat template


def conversation_to_messages(conv: Conversation, system: str | None = None) -> list[dict]:
    """Canonical conversation -> HF chat messages (what apply_chat_template takes)."""
    system = conv.system if conv.system is not None else system
    out: list[dict] = [] if system is None else [{"role": "system", "content": system}]
    for i, m in enumerate(conv.messages):
        _check_message(m, i)
        msg: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            msg["tool_calls"] = [
                {"type": "function", "function": {"name": tc.name, "arguments": _tool_arguments(tc.arguments, i)}}
                for tc in m.tool_calls
            ]
        out.append(msg)
    return out


def render_with_tokenizer(conv: Conversation, tokenizer, default_system: str | None = None) -> list[Segment]:
    """Segment the tokenizer's own chat template by rendering growing prefixes.

    For assistant message j, render(messages[:j], add_generation_prompt=True) marks where its answer
    starts, render(messages[:j+1]) where its turn ends, and the last turn-end token in between where
    the answer ends. Every such render must be a prefix of the full render, else the template cannot
    be segmented and a ValueError says so. (Only assistant turns are boundaries: templates may render
    a group of consecutive tool results differently while it is still open.)
    """
    messages = conversation_to_messages(conv, default_system)
    offset = len(messages) - len(conv.messages)  # 1 when a system message leads
    specials = _special_token_pattern(tokenizer)

    def render(msgs: list[dict], gen: bool = False) -> str:
        if not msgs:
            return ""
        try:
            return tokenizer.apply_chat_template(msgs, tools=conv.tools, tokenize=False, add_generation_prompt=gen)
        except Exception as err:  # jinja errors have many types; all mean "cannot render"
            raise _unsegmentable(tokenizer, f"rendering failed: {type(err).__name__}: {err}") from err

    def prefix(msgs: list[dict], what: str, gen: bool = False) -> int:
        text = render(msgs, gen)
        if not full.startswith(text):
            raise _unsegmentable(tokenizer, f"the render up to {what} is not a prefix of the full render")
        return len(text)

    full = render(messages)
    pos = prefix(messages[:offset], "the system message") if offset else 0
    out = _template_text(full[:pos], [conv.system or default_system or ""], specials, False, None)
    first = 0  # first message of the prompt chunk being collected
    for i, m in enumerate(conv.messages):
        if m.role != "assistant":
            continue
        j = i + offset
        start = prefix(messages[:j], f"the generation prompt before message {i}", gen=True)
        end = prefix(messages[: j + 1], f"message {i}")
        if start <= len(render(messages[:j])) or not pos <= start <= end:
            raise _unsegmentable(tokenizer, "add_generation_prompt=True adds no assistant header "
                                            f"before message {i}, so answers cannot be located")
        answer_end = _answer_end(full, start, end, tokenizer)
        prompt_contents = [x.content for x in conv.messages[first:i]]
        out += _template_text(full[pos:start], prompt_contents, specials, False, first)
        out += _template_text(full[start:answer_end], [m.content], specials, True, i)
        out += _template_text(full[answer_end:end], [], specials, False, i)
        pos, first = end, i + 1
    out += _template_text(full[pos:], [x.content for x in conv.messages[first:]], specials, False, first)
    return _merge_text(out)


def _answer_end(full: str, start: int, end: int, tokenizer) -> int:
    """End of the answer: just after the last turn-end token in full[start:end]."""
    markers = {t for t in (*TURN_END_TOKENS, tokenizer.eos_token) if t}
    best = -1
    for marker in markers:
        k = full.rfind(marker, start, end)
        if k >= 0:
            best = max(best, k + len(marker))
    if best < 0:
        raise _unsegmentable(tokenizer, f"an assistant turn ends without a turn-end token ({sorted(markers)}), "
                                        "so the model would never learn to stop")
    return best


def _template_text(text: str, contents: list[str], specials: re.Pattern | None, answer: bool,
                   index: int | None) -> list[Segment]:
    """Split template text at special tokens, leaving message contents (found in order) as plain text.

    Each content stays in one text segment with the template text around it (inference tokenizes
    them as one string too); only template text outside the contents is split at special tokens.
    """
    out: list[Segment] = []
    cursor = 0
    special_spans = [m.span() for m in specials.finditer(text)] if specials else []
    for content in contents:
        k = _find_outside_specials(text, content, cursor, special_spans)
        if k < 0:
            continue  # the template changed the content (e.g. stripped it): treated as template text
        out += _split_specials(text[cursor:k], specials, answer, index)
        out.append(Segment(content, answer=answer, message_index=index))
        cursor = k + len(content)
    out += _split_specials(text[cursor:], specials, answer, index)
    return _merge_text(out)


def _find_outside_specials(text: str, content: str, start: int, spans: list[tuple[int, int]]) -> int:
    """First index >= start where `content` occurs without cutting through a special token."""
    k = text.find(content, start) if content else -1
    while k >= 0:
        end = k + len(content)
        if not any(a < k < b or a < end < b for a, b in spans):
            return k
        k = text.find(content, k + 1)
    return -1


def _merge_text(segments: list[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for s in segments:
        if merged and not s.special and not merged[-1].special and s.answer == merged[-1].answer:
            merged[-1] = Segment(merged[-1].text + s.text, answer=s.answer, message_index=merged[-1].message_index)
        elif s.text:
            merged.append(s)
    return merged


def _split_specials(text: str, specials: re.Pattern | None, answer: bool, index: int | None) -> list[Segment]:
    if specials is None:
        return [Segment(text, answer=answer, message_index=index)] if text else []
    out = []
    for k, piece in enumerate(specials.split(text)):
        if piece:
            out.append(Segment(piece, special=k % 2 == 1, answer=answer, message_index=index))
    return out


def _special_token_pattern(tokenizer) -> re.Pattern | None:
    # Only tokens flagged special are split out: split_special_tokens=True (used for content) keeps
    # the other added tokens (e.g. Qwen's <tool_call>) as single ids, exactly like plain encoding.
    tokens = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special}, key=len, reverse=True)
    return re.compile("(" + "|".join(re.escape(t) for t in tokens) + ")") if tokens else None


def _unsegmentable(tokenizer, why: str) -> ValueError:
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return ValueError(f"The chat template of tokenizer '{name}' cannot be segmented into prompt and "
                      f"answer: {why}. Use --template chatml (or --template qwen2.5 for Qwen models).")


# ------------------------------------------------------------------------------ choosing a template


_RESOLVED: dict[tuple[int, str | None, str], str | None] = {}  # per tokenizer and template
_PROBE = Conversation([Message("user", "Hi there"), Message("assistant", "Hello!"),
                       Message("user", "How are you?"), Message("assistant", "Fine, thanks.")])


def is_qwen25_tokenizer(tokenizer) -> bool:
    """Qwen2.5's special-token ids, no Qwen3 <think>, and a Qwen2.5 (or no) chat template."""
    ids = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<tool_call>"])
    if ids != [151644, 151645, 151657] or "<think>" in tokenizer.get_added_vocab():
        return False
    template = tokenizer.chat_template
    return template is None or template == QWEN25_TEMPLATE or "You are Qwen, created by Alibaba Cloud" in template


def resolve_template(name: str, tokenizer) -> str:
    """'auto' -> 'qwen2.5' | 'tokenizer' (see the module doc); other names are checked and returned."""
    if name not in TEMPLATES:
        raise ValueError(f"--template {name!r} is unknown; choose one of {', '.join(TEMPLATES)}")
    key = (id(tokenizer), getattr(tokenizer, "chat_template", None), name)
    if key in _RESOLVED:
        return _RESOLVED[key]
    resolved = name
    if name in ("auto", "tokenizer") and not (name == "auto" and is_qwen25_tokenizer(tokenizer)):
        if not getattr(tokenizer, "chat_template", None):
            raise _unsegmentable(tokenizer, "it has no chat_template")
        render_with_tokenizer(_PROBE, tokenizer)  # raises when the template cannot be segmented
        resolved = "tokenizer"
    elif name == "auto":
        resolved = "qwen2.5"
    _RESOLVED[key] = resolved
    return resolved


def template_default_system(tokenizer) -> str | None:
    """The system prompt a ChatML tokenizer template inserts when none is given, if any."""
    template = getattr(tokenizer, "chat_template", None)
    key = (id(tokenizer), template, "default_system")
    if key not in _RESOLVED:
        _RESOLVED[key] = _probe_default_system(tokenizer) if template else None
    return _RESOLVED[key]


def _probe_default_system(tokenizer) -> str | None:
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    except Exception:  # a template that cannot render this probe has no usable default
        return None
    match = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.S)
    return match.group(1) if match else None
