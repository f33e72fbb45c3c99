"""sft.data.formats + sft.conversation validation: every format -> the exact ShareGPT dict; errors by reason."""
import json

import pytest

from sft.conversation import (
    Conversation,
    Message,
    RecordError,
    ToolCall,
    validate_conversation,
)
from sft.data.formats import (
    conversation_to_sharegpt,
    detect_format,
    read_conversations,
    to_conversation,
)

CALL = {"name": "get_weather", "arguments": {"city": "北京"}}
TOOL = {"name": "get_weather", "description": "查询天气",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def sharegpt(record, fmt=None):
    fmt = fmt or detect_format(record)
    conv = to_conversation(record, fmt)
    validate_conversation(conv)
    return conv_dict(conversation_to_sharegpt(conv))


def conv_dict(d):
    """Parse the JSON-string fields so that comparisons do not depend on JSON spacing."""
    d = json.loads(json.dumps(d))
    for turn in d.get("conversations", []):
        if turn["from"] == "function_call":
            turn["value"] = json.loads(turn["value"])
    if "tools" in d:
        d["tools"] = json.loads(d["tools"])
    return d


def test_firefly_raw():
    rec = {"kind": "Couplet", "input": "根据上联给出下联：春风得意", "target": "下联：秋月无边"}
    assert detect_format(rec) == "firefly"
    assert sharegpt(rec) == {"conversations": [{"from": "human", "value": "根据上联给出下联：春风得意"},
                                               {"from": "gpt", "value": "下联：秋月无边"}], "kind": "Couplet"}


def test_firefly_multiturn():
    rec = {"conversation_id": 44, "category": "Brainstorming", "system": "你是Firefly。",
           "conversation": [{"human": "问一", "assistant": "答一"}, {"human": "问二", "assistant": "答二"}]}
    assert detect_format(rec) == "firefly_multiturn"
    assert sharegpt(rec) == {
        "conversations": [{"from": "human", "value": "问一"}, {"from": "gpt", "value": "答一"},
                          {"from": "human", "value": "问二"}, {"from": "gpt", "value": "答二"}],
        "system": "你是Firefly。", "conversation_id": 44, "category": "Brainstorming"}


def test_sharegpt_with_tools_and_leading_system_message():
    rec = {"conversations": [{"from": "system", "value": "你是助手。"},
                             {"from": "human", "value": "北京天气？"},
                             {"from": "function_call", "value": json.dumps(CALL, ensure_ascii=False)},
                             {"from": "observation", "value": '{"weather": "晴"}'},
                             {"from": "gpt", "value": "北京晴。"}],
           "tools": json.dumps([TOOL], ensure_ascii=False), "id": 7}
    assert detect_format(rec) == "sharegpt"
    conv = to_conversation(rec, "sharegpt")
    assert conv.system == "你是助手。"
    assert conv.messages[1] == Message("assistant", "", [ToolCall("get_weather", {"city": "北京"})])
    assert conv.tools == [TOOL]
    assert sharegpt(rec) == {"conversations": [{"from": "human", "value": "北京天气？"},
                                               {"from": "function_call", "value": CALL},
                                               {"from": "observation", "value": '{"weather": "晴"}'},
                                               {"from": "gpt", "value": "北京晴。"}],
                             "system": "你是助手。", "tools": [TOOL], "id": 7}


def test_sharegpt_parallel_calls_and_string_arguments():
    calls = [{"name": "a", "arguments": '{"x": 1}'}, {"name": "b", "arguments": {"y": "二"}}]
    rec = {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": json.dumps(calls)},
                             {"from": "observation", "value": "1"}, {"from": "observation", "value": "2"},
                             {"from": "gpt", "value": "done"}]}
    conv = to_conversation(rec, "sharegpt")
    assert conv.messages[1].tool_calls == [ToolCall("a", {"x": 1}), ToolCall("b", {"y": "二"})]
    out = sharegpt(rec)
    assert out["conversations"][1]["value"] == [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {"y": "二"}}]


def test_openai_messages_with_wrapped_tool_calls():
    rec = {"messages": [{"role": "system", "content": "sys"},
                        {"role": "user", "content": [{"type": "text", "text": "北京"}, {"type": "text", "text": "天气？"}]},
                        {"role": "assistant", "content": None, "tool_calls": [
                            {"id": "c1", "type": "function",
                             "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}]},
                        {"role": "tool", "tool_call_id": "c1", "content": "晴"},
                        {"role": "assistant", "content": "晴天。"}],
           "tools": [{"type": "function", "function": TOOL}]}
    assert detect_format(rec) == "openai"
    assert sharegpt(rec) == {"conversations": [{"from": "human", "value": "北京天气？"},
                                               {"from": "function_call", "value": CALL},
                                               {"from": "observation", "value": "晴"},
                                               {"from": "gpt", "value": "晴天。"}],
                             "system": "sys", "tools": [{"type": "function", "function": TOOL}]}


def test_openai_content_said_with_a_call_survives_as_thought():
    rec = {"messages": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "我查一下。", "tool_calls": [{"function": CALL}]},
                        {"role": "tool", "content": "晴"}, {"role": "assistant", "content": "晴。"}]}
    out = sharegpt(rec)
    assert out["conversations"][1] == {"from": "function_call", "value": CALL, "thought": "我查一下。"}
    assert to_conversation(out | {"conversations": [dict(t, value=json.dumps(t["value"])) if t["from"] == "function_call"
                                                      else t for t in out["conversations"]]},
                           "sharegpt").messages[1].content == "我查一下。"


def test_alpaca_with_system_history_and_input():
    rec = {"instruction": "翻译成英文", "input": "你好", "output": "Hello", "system": "你是翻译。",
           "history": [["第一问", "第一答"]]}
    assert detect_format(rec) == "alpaca"
    assert sharegpt(rec) == {"conversations": [{"from": "human", "value": "第一问"}, {"from": "gpt", "value": "第一答"},
                                               {"from": "human", "value": "翻译成英文\n你好"},
                                               {"from": "gpt", "value": "Hello"}],
                             "system": "你是翻译。"}


def test_alpaca_empty_input_is_skipped():
    assert sharegpt({"instruction": "讲个笑话", "input": "", "output": "好的"})["conversations"][0] == \
        {"from": "human", "value": "讲个笑话"}


def test_prompt_completion_strings_and_messages():
    assert sharegpt({"prompt": "1+1=", "completion": "2"}) == {
        "conversations": [{"from": "human", "value": "1+1="}, {"from": "gpt", "value": "2"}]}
    rec = {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                      {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
           "completion": [{"role": "assistant", "content": "d"}]}
    assert detect_format(rec) == "prompt_completion"
    assert sharegpt(rec) == {"conversations": [{"from": "human", "value": "a"},
                                               {"from": "gpt", "value": "b", "train": False},
                                               {"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}],
                             "system": "s"}


def test_plain_text():
    rec = {"text": "床前明月光。", "source": "poems"}
    assert detect_format(rec) == "text"
    conv = to_conversation(rec, "text")
    assert conv.meta["plain_text"] is True and conv.messages == [Message("assistant", "床前明月光。")]
    assert sharegpt(rec) == {"text": "床前明月光。", "source": "poems"}


def test_loss_flags_map_to_message_train():
    rec = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0},
                        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d", "loss": True}]}
    conv = to_conversation(rec, "openai")
    assert [m.train for m in conv.messages] == [None, False, None, True]
    assert [t.get("train") for t in sharegpt(rec)["conversations"]] == [None, False, None, True]



# LLaMA-Factory v1's messages format: content is a list of {"type": "text", "value": ...} parts and every
# message has a loss_weight (0: not trained, 1: trained).
LLAMAFACTORY_V1 = {"messages": [
    {"role": "system", "content": [{"type": "text", "value": "You are helpful."}], "loss_weight": 0.0},
    {"role": "user", "content": [{"type": "text", "value": "Hi, "}, {"type": "text", "value": "who are you?"}],
     "loss_weight": 0.0},
    {"role": "assistant", "content": [{"type": "text", "value": "I am a bot."}], "loss_weight": 0.0},
    {"role": "user", "content": [{"type": "text", "value": "And?"}], "loss_weight": 0.0},
    {"role": "assistant", "content": [{"type": "text", "value": "That is all."}], "loss_weight": 1.0},
]}


def test_llamafactory_v1_text_parts_and_loss_weight():
    conv = to_conversation(LLAMAFACTORY_V1, detect_format(LLAMAFACTORY_V1))
    validate_conversation(conv)
    assert conv.system == "You are helpful."
    assert conv.messages == [Message("user", "Hi, who are you?", train=False),
                             Message("assistant", "I am a bot.", train=False),
                             Message("user", "And?", train=False), Message("assistant", "That is all.", train=True)]


def test_llamafactory_v1_loss_weight_0_is_not_trained(qwen):
    from sft.tokens.encoding import IGNORE_INDEX, EncodeOptions, encode_conversation

    sample = encode_conversation(to_conversation(LLAMAFACTORY_V1, "openai"), qwen, EncodeOptions(template="qwen2.5"))
    trained = qwen.decode([i for i, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX])
    assert trained == "That is all.<|im_end|>"  # the first answer (loss_weight 0) carries no loss


def test_a_weight_other_than_0_or_1_is_a_clear_error():
    record = {"messages": [{"role": "user", "content": [{"type": "text", "value": "q"}]},
                           {"role": "assistant", "content": [{"type": "text", "value": "a"}], "loss_weight": 0.5}]}
    with pytest.raises(RecordError, match="loss_weight=0.5.*weighted losses are not supported") as e:
        to_conversation(record, "openai")
    assert e.value.reason == "bad_loss_flag"


ROUND_TRIP = [
    {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"}], "kind": "OpenQA"},
    {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "train": False},
                       {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}],
     "system": "sys", "category": "c", "id": "x1"},
    {"conversations": [{"from": "human", "value": "北京天气？"},
                       {"from": "function_call", "value": json.dumps(CALL, ensure_ascii=False)},
                       {"from": "observation", "value": "晴"}, {"from": "gpt", "value": "晴。"}],
     "tools": json.dumps([TOOL], ensure_ascii=False)},
    {"conversations": [{"from": "human", "value": "q"},
                       {"from": "function_call", "value": json.dumps([CALL, CALL]), "thought": "查两次"},
                       {"from": "observation", "value": "1"}, {"from": "observation", "value": "2"},
                       {"from": "gpt", "value": "ok"}]},
    {"text": "纯文本", "id": 3},
]


@pytest.mark.parametrize("rec", ROUND_TRIP)
def test_sharegpt_round_trip_is_lossless(rec):
    fmt = "text" if "text" in rec else "sharegpt"
    out = conversation_to_sharegpt(to_conversation(rec, fmt))
    assert conv_dict(out) == conv_dict(rec)
    assert set(out) == set(rec)


@pytest.mark.parametrize("record, fmt, reason", [
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{bad"}]},
     "sharegpt", "bad_function_call"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": "{bad"},
     "sharegpt", "bad_tools"),
    ({"conversations": [{"from": "robot", "value": "q"}]}, "sharegpt", "unknown_role"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "system", "value": "s"}]}, "sharegpt",
     "misplaced_system"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "critic", "content": "a"}]}, "openai", "unknown_role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "openai",
     "non_string_content"),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}]},
     "openai", "bad_function_call"),
    ({"messages": [{"role": "user", "content": "q", "train": 0.5}]}, "openai", "bad_loss_flag"),
    ({"instruction": ["a"], "output": "b"}, "alpaca", "non_string_content"),
    ({"instruction": "a", "output": "b", "history": [["only one"]]}, "alpaca", "bad_field_type"),
    ({"input": "q"}, "firefly", "missing_field"),
    ({"conversation": [{"assistant": "a"}]}, "firefly_multiturn", "missing_field"),
    ({"prompt": 3, "completion": "a"}, "prompt_completion", "non_string_content"),
    ([1, 2], "sharegpt", "not_an_object"),
])
def test_normalizer_errors_name_the_reason(record, fmt, reason):
    with pytest.raises(RecordError) as e:
        to_conversation(record, fmt)
    assert e.value.reason == reason


def test_detect_format_unknown_keys():
    with pytest.raises(RecordError, match="cannot tell the format") as e:
        detect_format({"question": "q", "answer": "a"})
    assert e.value.reason == "unknown_format"


@pytest.mark.parametrize("messages, reason", [
    ([], "empty_conversation"),
    ([Message("assistant", "a")], "bad_role_order"),
    ([Message("user", "q"), Message("user", "q2"), Message("assistant", "a")], "bad_role_order"),
    ([Message("user", "q"), Message("assistant", "a"), Message("user", "q2")], "no_final_assistant"),
    ([Message("user", "q"), Message("assistant", "", [ToolCall("f", {})]), Message("assistant", "a")], "bad_role_order"),
    ([Message("user", "q"), Message("assistant", "", [ToolCall("f", {})]), Message("tool", "r")], "no_final_assistant"),
    ([Message("user", "q"), Message("tool", "r"), Message("assistant", "a")], "bad_role_order"),
    ([Message("user", " \n"), Message("assistant", "a")], "empty_content"),
    ([Message("user", "q"), Message("assistant", "")], "empty_content"),
    ([Message("user", 5), Message("assistant", "a")], "non_string_content"),
    ([Message("system", "s"), Message("assistant", "a")], "unknown_role"),
    ([Message("user", "q"), Message("assistant", "", [ToolCall("", {})]), Message("tool", "r"),
      Message("assistant", "a")], "bad_function_call"),
])
def test_validate_conversation(messages, reason):
    with pytest.raises(RecordError) as e:
        validate_conversation(Conversation(messages))
    assert e.value.reason == reason


def test_validate_accepts_tool_turns_and_limits_length():
    conv = Conversation([Message("user", "q"), Message("assistant", "", [ToolCall("f", {"a": 1})]),
                         Message("tool", "r1"), Message("tool", "r2"), Message("assistant", "a")])
    validate_conversation(conv)
    with pytest.raises(RecordError, match="over --max_chars=5") as e:
        validate_conversation(Conversation([Message("user", "1234"), Message("assistant", "5678")]), max_chars=5)
    assert e.value.reason == "too_long"


def test_read_conversations_gives_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": ""}\n', encoding="utf-8")
    items = list(read_conversations(str(path)))
    assert items[0].conversation.messages[1].content == "b" and items[0].fmt == "alpaca"
    err = items[1].error
    assert (err.source, err.line, err.reason) == (str(path), 3, "empty_content")
    assert str(err).startswith(f"{path}:3: empty_content: ")
