import copy
import json

import pytest

from sft.chat_templates import FIREFLY_DEFAULT_SYSTEM
from sft.conversation import Conversation, Message, ToolCall
from sft.tokens.template import (
    Segment,
    conversation_to_messages,
    render_segments,
    render_text,
    resolve_template,
    template_default_system,
)

TOOLS = [{"name": "get_weather", "description": "查询天气",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


def _jinja(tokenizer, conv, system=None):
    return tokenizer.apply_chat_template(conversation_to_messages(conv, system), tools=conv.tools, tokenize=False)


CONVERSATIONS = {
    "default_system": Conversation([Message("user", "Hi"), Message("assistant", "Hello!")]),
    "custom_system": Conversation([Message("user", "a"), Message("assistant", "b"), Message("user", "c"),
                                   Message("assistant", "d")], system="Be brief."),
    "empty_system": Conversation([Message("user", "a"), Message("assistant", "b")], system=""),
    "tools_parallel_calls": Conversation(
        [Message("user", "北京和上海的天气？"),
         Message("assistant", "我来查一下。", tool_calls=[ToolCall("get_weather", {"city": "北京"}),
                                                   ToolCall("get_weather", {"city": "上海"})]),
         Message("tool", '{"temp": 20}'), Message("tool", '{"temp": 25}'),
         Message("assistant", "北京20度，上海25度。")], tools=TOOLS),
    "tools_with_system": Conversation(
        [Message("user", "Weather?"), Message("assistant", "", tool_calls=[ToolCall("get_weather", {"city": "Oslo"})]),
         Message("tool", "cold"), Message("assistant", "Cold.")], system="Use tools.", tools=TOOLS),
    "leading_newlines": Conversation([Message("user", "\nq"), Message("assistant", "\n\n a 😀")]),
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_qwen25_renderer_matches_the_jinja_template(qwen, name):
    conv = CONVERSATIONS[name]
    assert render_text(render_segments(conv, qwen, "qwen2.5")) == _jinja(qwen, conv)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_tokenizer_segmentation_matches_the_python_renderer(qwen, name):
    conv = CONVERSATIONS[name]
    by_jinja = render_segments(conv, qwen, "tokenizer")
    by_python = render_segments(conv, qwen, "qwen2.5")
    # The same pieces with the same flags; only the message each prompt piece is filed under may differ.
    assert [(s.text, s.special, s.answer) for s in by_jinja] == [(s.text, s.special, s.answer) for s in by_python]


def test_segments_of_a_single_turn(qwen):
    conv = Conversation([Message("user", "Hi"), Message("assistant", "Hello!")], system="S")
    assert render_segments(conv, qwen, "qwen2.5") == [
        Segment("<|im_start|>", special=True), Segment("system\nS"), Segment("<|im_end|>", special=True),
        Segment("\n"),
        Segment("<|im_start|>", special=True, message_index=0), Segment("user\nHi", message_index=0),
        Segment("<|im_end|>", special=True, message_index=0), Segment("\n", message_index=0),
        Segment("<|im_start|>", special=True, message_index=1), Segment("assistant\n", message_index=1),
        Segment("Hello!", answer=True, message_index=1),
        Segment("<|im_end|>", special=True, answer=True, message_index=1), Segment("\n", message_index=1),
    ]


def test_tool_call_answer_starts_after_the_generation_prompt(qwen):
    conv = CONVERSATIONS["tools_with_system"]
    answers = [s.text for s in render_segments(conv, qwen, "qwen2.5") if s.answer]
    assert answers == ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
                       "<|im_end|>", "Cold.", "<|im_end|>"]


def test_tool_arguments_given_as_a_json_string_are_not_double_encoded(qwen):
    as_dict = CONVERSATIONS["tools_with_system"]
    as_string = Conversation([Message("user", "Weather?"),
                              Message("assistant", "", tool_calls=[ToolCall("get_weather", '{"city": "Oslo"}')]),
                              Message("tool", "cold"), Message("assistant", "Cold.")],
                             system="Use tools.", tools=TOOLS)
    assert render_segments(as_string, qwen, "qwen2.5") == render_segments(as_dict, qwen, "qwen2.5")
    assert '"arguments": {"city": "Oslo"}' in render_text(render_segments(as_string, qwen, "qwen2.5"))


def test_bad_tool_arguments_name_the_message(qwen):
    conv = Conversation([Message("user", "q"), Message("assistant", "", tool_calls=[ToolCall("f", "{oops")])])
    with pytest.raises(ValueError, match="message 1: tool call arguments are not valid JSON"):
        render_segments(conv, qwen, "qwen2.5")


def test_unknown_role_names_the_message(qwen):
    conv = Conversation([Message("human", "q"), Message("assistant", "a")])
    with pytest.raises(ValueError, match="message 0 has role 'human'"):
        render_segments(conv, qwen, "qwen2.5")


def test_system_prompt_presets(qwen):
    conv = CONVERSATIONS["default_system"]
    firefly = render_text(render_segments(conv, qwen, "qwen2.5", system_prompt="firefly"))
    assert firefly.startswith(f"<|im_start|>system\n{FIREFLY_DEFAULT_SYSTEM}<|im_end|>\n")
    custom = render_text(render_segments(conv, qwen, "qwen2.5", system_prompt="Answer in French."))
    assert custom.startswith("<|im_start|>system\nAnswer in French.<|im_end|>\n")
    # The record's own system prompt wins over the default.
    own = render_text(render_segments(CONVERSATIONS["custom_system"], qwen, "qwen2.5", system_prompt="firefly"))
    assert own.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_chatml_takes_the_tokenizers_default_system(smol):
    assert template_default_system(smol) == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    conv = CONVERSATIONS["custom_system"]
    for c in (conv, CONVERSATIONS["default_system"]):
        assert render_text(render_segments(c, smol, "chatml")) == _jinja(smol, c)


def test_auto_picks_qwen25_for_qwen_and_the_tokenizer_template_otherwise(qwen, smol):
    assert resolve_template("auto", qwen) == "qwen2.5"
    assert resolve_template("auto", smol) == "tokenizer"
    with pytest.raises(ValueError, match="--template 'llama3' is unknown"):
        resolve_template("llama3", qwen)


def test_smollm2_template_segments_chatml(smol):
    conv = CONVERSATIONS["custom_system"]
    segments = render_segments(conv, smol, "tokenizer")
    assert [s.text for s in segments if s.answer] == ["b", "<|im_end|>", "d", "<|im_end|>"]
    assert render_text(segments) == _jinja(smol, conv)
    assert [(s.text, s.special, s.answer) for s in segments] == \
        [(s.text, s.special, s.answer) for s in render_segments(conv, smol, "chatml")]


def _with_template(tokenizer, template: str | None):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = template
    return tokenizer


def test_template_without_generation_prompt_is_refused_with_a_fix(smol):
    tokenizer = _with_template(smol, "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    conv = CONVERSATIONS["default_system"]
    with pytest.raises(ValueError, match=r"smollm2-135m-instruct.*adds no assistant header.*--template chatml"):
        render_segments(conv, tokenizer, "tokenizer")
    with pytest.raises(ValueError, match="--template chatml"):
        resolve_template("auto", tokenizer)


def test_template_whose_prefixes_are_not_prefixes_is_refused_with_a_fix(smol):
    # Announces the number of turns up front: every growing prefix renders differently.
    tokenizer = _with_template(smol, "{{ messages | length }} turns\n{% for m in messages %}<|im_start|>{{ m.role }}\n"
                               "{{ m.content }}<|im_end|>\n{% endfor %}"
                               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(ValueError, match=r"smollm2-135m-instruct.*not a prefix.*--template chatml"):
        render_segments(CONVERSATIONS["custom_system"], tokenizer, "tokenizer")


def test_tokenizer_without_a_template_is_refused(smol):
    tokenizer = _with_template(smol, None)
    with pytest.raises(ValueError, match="has no chat_template.*--template chatml"):
        resolve_template("auto", tokenizer)


def test_conversation_to_messages_wraps_tool_calls():
    conv = CONVERSATIONS["tools_with_system"]
    assert conversation_to_messages(conv) == [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "cold"},
        {"role": "assistant", "content": "Cold."},
    ]
    assert json.dumps(conversation_to_messages(conv))  # plain JSON-serializable data
