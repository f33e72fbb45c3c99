"""The OpenAI wire format for `serve`: request bodies -> Conversation, generated text -> response objects.

    request = ChatRequest.model_validate(body)             # types checked by pydantic (422 when wrong)
    conv = chat_conversation(request)                      # roles, content parts, tool calls (ApiError 400)
    content, calls = parse_tool_calls(text)                # Qwen2.5 <tool_call> blocks -> OpenAI tool_calls

No model here and no web framework: plain data in, plain dicts out, so that it is tested without a server.
An ApiError carries the HTTP status and the OpenAI error body {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sft.conversation import Conversation, Message, ToolCall

MAX_STOP_SEQUENCES = 4  # as OpenAI's API
TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
TOOL_CALL_START = "<tool_call>"


class ApiError(Exception):
    """An error the client caused (or the server's state, 503): its status and OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------- requests


class _Request(BaseModel):
    # Unknown fields (user, frequency_penalty, logit_bias, ...) are accepted and ignored, as many clients
    # send them by default; the fields we read are type-checked.
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False  # vLLM's extension, for fixed-length benchmarks


class ChatRequest(_Request):
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_Request):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for /v1/completions


def stop_sequences(request: _Request) -> list[str]:
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ApiError(400, f"stop: at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise ApiError(400, "stop: sequences must not be empty", "stop")
    return stops


def check_common(request: _Request) -> None:
    if request.n != 1:
        raise ApiError(400, f"n={request.n}: this server generates one choice per request; send n=1", "n")


def completion_prompt(request: CompletionRequest) -> str:
    if isinstance(request.prompt, str):
        return request.prompt
    if len(request.prompt) != 1:
        raise ApiError(400, f"prompt: a list of {len(request.prompt)} prompts; send one prompt per request", "prompt")
    return request.prompt[0]


def chat_conversation(request: ChatRequest, max_messages: int) -> Conversation:
    """OpenAI messages (+ tools) -> the canonical Conversation the training renderer takes."""
    if len(request.messages) > max_messages:
        raise ApiError(400, f"messages: {len(request.messages)} messages, at most {max_messages} allowed",
                       "messages", "too_many_messages")
    system, messages = None, []
    for index, raw in enumerate(request.messages):
        role = raw.get("role")
        where = f"messages[{index}]"
        if role in ("system", "developer"):
            if messages or system is not None:
                raise ApiError(400, f"{where}: a {role} message is only allowed first (the training template has "
                               "one system block); merge it into the first message", f"{where}.role")
            system = _text(raw.get("content"), where)
        elif role in ("user", "tool"):
            messages.append(Message(role, _text(raw.get("content"), where)))
        elif role == "assistant":
            calls = [_tool_call(call, f"{where}.tool_calls[{k}]") for k, call in enumerate(raw.get("tool_calls") or [])]
            content = raw.get("content")
            messages.append(Message("assistant", "" if content is None and calls else _text(content, where),
                                    tool_calls=calls))
        else:
            raise ApiError(400, f"{where}: unknown role {role!r}; expected system, developer, user, assistant or tool",
                           f"{where}.role")
    if not messages:
        raise ApiError(400, "messages: no user message to answer", "messages")
    tools = None if request.tool_choice == "none" else [_tool(t, k) for k, t in enumerate(request.tools or [])] or None
    return Conversation(messages, system=system, tools=tools)


def _text(content: Any, where: str) -> str:
    """A message's content: a string or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}.content[{k}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                               "are supported by this text model", f"{where}.content")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"{where}.content: expected a string or a list of text parts, got "
                   f"{type(content).__name__}", f"{where}.content")


def _tool_call(call: Any, where: str) -> ToolCall:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ApiError(400, f"{where}: expected {{\"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}",
                       where)
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError as err:
            raise ApiError(400, f"{where}.function.arguments: not valid JSON ({err.msg})", where) from err
    if not isinstance(arguments, dict):
        raise ApiError(400, f"{where}.function.arguments: expected a JSON object", where)
    return ToolCall(function["name"], arguments)


def _tool(tool: Any, index: int) -> dict:
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ApiError(400, f"tools[{index}]: expected {{\"type\": \"function\", \"function\": {{\"name\", ...}}}}",
                       f"tools[{index}]")
    return function


# ------------------------------------------------------------------------------------ responses


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """Generated text -> (content without the tool-call blocks or None, OpenAI tool_calls).

    The Qwen2.5 format the trainer renders: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`.
    A block that is not such JSON stays in the content, so nothing the model wrote is lost.
    """
    calls, kept, last = [], [], 0
    for match in TOOL_CALL.finditer(text):
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            continue
        arguments = call.get("arguments", {})
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"], "arguments": arguments if isinstance(arguments, str)
                                   else json.dumps(arguments, ensure_ascii=False)}})
        kept.append(text[last:match.start()])
        last = match.end()
    kept.append(text[last:])
    content = "".join(kept).strip() if calls else text
    return (content or None) if calls else content, calls


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int,
                  tools: bool) -> dict:
    content, calls = parse_tool_calls(text) if tools else (text, [])
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
        finish = "tool_calls"
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish: str | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}


def completion_response(rid: str, model: str, text: str, finish: str, prompt_tokens: int,
                        completion_tokens: int) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(rid: str, model: str, created: int, text: str, finish: str | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

