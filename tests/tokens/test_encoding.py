"""Golden tests with the real Qwen2.5 tokenizer: literal ids and labels, checked by decoding once.

Qwen2.5 ids worth knowing when reading the literals: 151644 <|im_start|>, 151645 <|im_end|>,
151657 <tool_call>, 151658 </tool_call>, 8948 "system", 872 "user", 77091 "assistant", 198 "\n",
271 "\n\n".
"""
import pytest

from sft.conversation import Conversation, Message, ToolCall
from sft.data.formats import to_conversation
from sft.tokens.encoding import (
    IGNORE_INDEX,
    EncodeOptions,
    EncodeStats,
    encode_conversation,
    encode_conversations,
)
from sft.tokens.template import conversation_to_messages

M = IGNORE_INDEX
# "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
QWEN_SYSTEM = [151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525, 264, 10950,
               17847, 13, 151645, 198]


def _encode(conv, tokenizer, **options):
    return encode_conversation(conv, tokenizer, EncodeOptions(**options))


def _rendered(tokenizer, conv, **kwargs):
    return tokenizer.apply_chat_template(conversation_to_messages(conv), tools=conv.tools, tokenize=False, **kwargs)


TWO_TURNS = Conversation([Message("user", "What is 2+2?"), Message("assistant", "4."),
                          Message("user", "And 3+3?"), Message("assistant", "6.")], system="Be brief.")
TWO_TURN_IDS = [151644, 8948, 198, 3430, 9814, 13, 151645, 198,  # <|im_start|>system\nBe brief.<|im_end|>\n
                151644, 872, 198, 3838, 374, 220, 17, 10, 17, 30, 151645, 198,  # user\nWhat is 2+2?
                151644, 77091, 198, 19, 13, 151645, 198,  # assistant\n4.<|im_end|>\n
                151644, 872, 198, 3036, 220, 18, 10, 18, 30, 151645, 198,  # user\nAnd 3+3?
                151644, 77091, 198, 21, 13, 151645, 198]  # assistant\n6.<|im_end|>\n

TOOL_RECORD = {  # OpenAI messages; the call's arguments are a JSON string, as the OpenAI API returns them
    "messages": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": '{"temp_c": 18}'},
        {"role": "assistant", "content": "18°C."},
    ],
    "tools": [{"name": "get_weather", "description": "Get the weather",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}],
}
TOOL_IDS = [
    # <|im_start|>system\nUse tools.\n\n# Tools\n\n ... <tools>\n{"type": "function", ...}\n</tools>\n\n ... <|im_end|>\n
    151644, 8948, 198, 10253, 7375, 382, 2, 13852, 271, 2610, 1231, 1618, 825, 476, 803, 5746, 311, 7789,
    448, 279, 1196, 3239, 382, 2610, 525, 3897, 448, 729, 32628, 2878, 366, 15918, 1472, 15918, 29, 11874,
    9492, 510, 27, 15918, 397, 4913, 1313, 788, 330, 1688, 497, 330, 1688, 788, 5212, 606, 788, 330, 455,
    69364, 497, 330, 4684, 788, 330, 1949, 279, 9104, 497, 330, 13786, 788, 5212, 1313, 788, 330, 1700, 497,
    330, 13193, 788, 5212, 8926, 788, 5212, 1313, 788, 330, 917, 9207, 2137, 330, 6279, 788, 4383, 8926,
    1341, 3417, 532, 522, 15918, 1339, 2461, 1817, 729, 1618, 11, 470, 264, 2951, 1633, 448, 729, 829, 323,
    5977, 2878, 220, 151657, 151658, 11874, 9492, 510, 151657, 198, 4913, 606, 788, 366, 1688, 11494, 8066,
    330, 16370, 788, 366, 2116, 56080, 40432, 31296, 151658, 151645, 198,
    151644, 872, 198, 28981, 304, 12095, 30, 151645, 198,  # user\nWeather in Paris?
    # assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n
    151644, 77091, 198, 151657, 198, 4913, 606, 788, 330, 455, 69364, 497, 330, 16370, 788, 5212, 8926, 788, 330,
    59604, 95642, 151658, 151645, 198,
    # user\n<tool_response>\n{"temp_c": 18}\n</tool_response><|im_end|>\n
    151644, 872, 198, 27, 14172, 9655, 397, 4913, 3888, 666, 788, 220, 16, 23, 532, 522, 14172, 9655, 29, 151645, 198,
    151644, 77091, 198, 16, 23, 30937, 13, 151645, 198,  # assistant\n18°C.<|im_end|>\n
]


def test_single_turn_with_the_default_system(qwen):
    sample = _encode(Conversation([Message("user", "Hi"), Message("assistant", "Hello!")]), qwen)
    assert sample.input_ids == QWEN_SYSTEM + [151644, 872, 198, 13048, 151645, 198,  # user\nHi<|im_end|>\n
                                              151644, 77091, 198, 9707, 0, 151645, 198]  # assistant\nHello!<|im_end|>\n
    assert sample.labels == [M] * 30 + [9707, 0, 151645] + [M]
    assert (sample.num_tokens, sample.num_supervised, sample.truncated) == (34, 3, False)


def test_two_turns_with_a_custom_system_train_both_answers(qwen):
    sample = _encode(TWO_TURNS, qwen)
    assert sample.input_ids == TWO_TURN_IDS
    assert sample.labels == [M] * 23 + [19, 13, 151645] + [M] * 15 + [21, 13, 151645] + [M]
    assert qwen.decode([x for x in sample.labels if x != M]) == "4.<|im_end|>6.<|im_end|>"


def test_last_turn_only(qwen):
    sample = _encode(TWO_TURNS, qwen, last_turn_only=True)
    assert sample.input_ids == TWO_TURN_IDS
    assert sample.labels == [M] * 41 + [21, 13, 151645] + [M]


def test_tool_calling_conversation(qwen):
    conv = to_conversation(TOOL_RECORD, "openai")
    assert conv.messages[1].tool_calls == [ToolCall("get_weather", {"city": "Paris"})]
    sample = _encode(conv, qwen)
    assert sample.input_ids == TOOL_IDS
    assert sample.labels == [M] * 151 + [151657, 198, 4913, 606, 788, 330, 455, 69364, 497, 330, 16370, 788, 5212,
                                         8926, 788, 330, 59604, 95642, 151658, 151645] + [M] * 25 \
        + [16, 23, 30937, 13, 151645] + [M]
    assert qwen.decode([x for x in sample.labels if x != M]) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>18°C.<|im_end|>')
    assert qwen.decode(sample.input_ids) == _rendered(qwen, conv)


def test_chinese_content(qwen):
    conv = Conversation([Message("user", "你好，北京在哪里？"), Message("assistant", "北京在中国北方。")],
                        system="你是一个乐于助人的助手。")
    sample = _encode(conv, qwen)
    assert sample.input_ids == [151644, 8948, 198, 56568, 101909, 99350, 34204, 99262, 103947, 110498, 1773, 151645, 198,
                                151644, 872, 198, 108386, 3837, 68990, 105930, 11319, 151645, 198,
                                151644, 77091, 198, 68990, 104377, 105364, 1773, 151645, 198]
    assert sample.labels == [M] * 26 + [68990, 104377, 105364, 1773, 151645] + [M]
    assert qwen.decode([68990, 104377, 105364, 1773]) == "北京在中国北方。"


def test_smollm2_tokenizer_template(smol):
    conv = Conversation([Message("user", "Hi"), Message("assistant", "Hello!"), Message("user", "Bye"),
                         Message("assistant", "Bye!")])
    sample = _encode(conv, smol, template="tokenizer")
    # SmolLM2's template adds its own default system prompt; <|im_start|> is 1, <|im_end|> is 2.
    assert sample.input_ids == [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018,
                                411, 407, 19712, 8182, 2, 198,
                                1, 4093, 198, 26843, 2, 198,  # user\nHi
                                1, 520, 9531, 198, 19556, 17, 2, 198,  # assistant\nHello!
                                1, 4093, 198, 3087, 85, 2, 198,  # user\nBye
                                1, 520, 9531, 198, 3087, 85, 17, 2, 198]  # assistant\nBye!
    assert sample.labels == [M] * 31 + [19556, 17, 2] + [M] * 12 + [3087, 85, 17, 2] + [M]
    for template in ("chatml", "auto"):
        assert _encode(conv, smol, template=template) == sample


# ------------------------------------------------------------------ agreement with inference


CONVERSATIONS = [
    TWO_TURNS,
    Conversation([Message("user", "q"), Message("assistant", "\nstarts with a newline"),
                  Message("user", "\n\nq2"), Message("assistant", "\n\ntwo newlines"),
                  Message("user", "  spaced  "), Message("assistant", "  two spaces"),
                  Message("user", "中文"), Message("assistant", "中文回答"),
                  Message("user", "emoji"), Message("assistant", "😀 smile\n")]),
    Conversation([Message("user", "北京和上海？"),
                  Message("assistant", "查一下。", tool_calls=[ToolCall("get_weather", {"city": "北京"}),
                                                          ToolCall("get_weather", {"city": "上海"})]),
                  Message("tool", "20"), Message("tool", "25"), Message("assistant", "\n北京20，上海25。")],
                 tools=TOOL_RECORD["tools"]),
]


@pytest.mark.parametrize("template", ["qwen2.5", "tokenizer"])
@pytest.mark.parametrize("k", range(len(CONVERSATIONS)))
def test_decoding_gives_the_chat_template_render(qwen, template, k):
    conv = CONVERSATIONS[k]
    assert qwen.decode(_encode(conv, qwen, template=template).input_ids) == _rendered(qwen, conv)


@pytest.mark.parametrize("lead", ["\n", "\n\n", "  ", " ", "中文", "😀", "\t"])
@pytest.mark.parametrize("template", ["qwen2.5", "tokenizer"])
def test_each_prompt_prefix_equals_what_inference_feeds(qwen, lead, template):
    conv = Conversation([Message("user", "q1"), Message("assistant", "a1"),
                         Message("user", lead + "q2"), Message("assistant", lead + "answer" + lead)],
                        system="s", tools=TOOL_RECORD["tools"])
    sample = _encode(conv, qwen, template=template)
    messages = conversation_to_messages(conv)  # messages[0] is the system message
    for i in (1, 3):
        prompt = qwen.apply_chat_template(messages[: i + 1], tools=conv.tools, add_generation_prompt=True)["input_ids"]
        assert sample.input_ids[: len(prompt)] == prompt
        # ... and the answer starts right there: trained from the first token after the prompt,
        # tokenized on its own exactly as the model generates it.
        assert sample.labels[len(prompt) - 1] == M and sample.labels[len(prompt)] != M
        answer = qwen(conv.messages[i].content, add_special_tokens=False)["input_ids"]
        assert sample.input_ids[len(prompt): len(prompt) + len(answer) + 1] == answer + [151645]


def test_an_answer_starting_with_a_newline_keeps_its_own_token(qwen):
    # One-string tokenization would merge the header's "\n" and the answer's "\n" into 271 "\n\n",
    # a token the model never emits after a prompt that already ends in "\n".
    conv = Conversation([Message("user", "q"), Message("assistant", "\nA"), Message("user", "r"),
                         Message("assistant", "B")], system="")
    sample = _encode(conv, qwen)
    assert sample.input_ids == [151644, 8948, 198, 151645, 198, 151644, 872, 198, 80, 151645, 198,
                                151644, 77091, 198, 198, 32, 151645, 198,  # assistant\n + "\nA" as generated
                                151644, 872, 198, 81, 151645, 198, 151644, 77091, 198, 33, 151645, 198]
    assert sample.labels == [M] * 14 + [198, 32, 151645] + [M] * 10 + [33, 151645] + [M]
    # The one place training and inference can differ, by choice: re-rendering this history for the
    # next turn, apply_chat_template tokenizes "assistant\n\nA" as [77091, 271, 32]. One sequence
    # cannot hold both; the trained answer keeps the tokens the model actually generates.
    history = qwen.apply_chat_template(conversation_to_messages(conv)[:4], add_generation_prompt=True)["input_ids"]
    assert history[12:15] == [77091, 271, 32]


@pytest.mark.parametrize("template", ["qwen2.5", "tokenizer"])
def test_special_token_text_in_content_stays_plain_text(qwen, template):
    conv = Conversation([Message("user", "Print <|im_end|> then <|im_start|>system and <|endoftext|>"),
                         Message("assistant", "Sure: <|im_end|><|im_start|>")], system="s")
    sample = _encode(conv, qwen, template=template)
    structural = [151644, 151645] * 3  # one <|im_start|> ... <|im_end|> per block: system, user, assistant
    assert [t for t in sample.input_ids if t >= 151643] == structural
    assert qwen.decode(sample.input_ids) == _rendered(qwen, conv)
    trained = [t for t in sample.labels if t != M]
    assert trained[-1] == 151645 and 151645 not in trained[:-1]
    assert qwen.decode(trained) == "Sure: <|im_end|><|im_start|><|im_end|>"


# ------------------------------------------------------------------------------ options


def test_train_on_prompt_trains_everything(qwen):
    sample = _encode(TWO_TURNS, qwen, train_on_prompt=True)
    assert sample.labels == TWO_TURN_IDS


def test_message_train_flag_is_honoured(qwen):
    conv = Conversation([Message("user", "What is 2+2?"), Message("assistant", "4.", train=False),
                         Message("user", "And 3+3?"), Message("assistant", "6.")], system="Be brief.")
    assert _encode(conv, qwen).labels == [M] * 41 + [21, 13, 151645] + [M]
    # An explicit True wins over last_turn_only.
    conv.messages[1].train = True
    assert _encode(conv, qwen, last_turn_only=True).labels == \
        [M] * 23 + [19, 13, 151645] + [M] * 15 + [21, 13, 151645] + [M]


def test_nothing_to_train_is_dropped_and_counted(qwen):
    conv = Conversation([Message("user", "q"), Message("assistant", "a", train=False)])
    stats = EncodeStats()
    assert encode_conversation(conv, qwen, EncodeOptions(), stats) is None
    assert stats.dropped == {"no_trained_turn": 1} and stats.encoded == 0 and stats.last_drop == "no_trained_turn"


def test_plain_text_trains_every_token_plus_eos(qwen):
    conv = Conversation([Message("assistant", "北京 <|im_end|>")], meta={"plain_text": True})
    sample = _encode(conv, qwen)
    assert sample.input_ids == [68990, 82639, 318, 6213, 91, 29, 151645]  # 北京, " <|", im, _end, |, >, eos
    assert sample.labels == sample.input_ids
    assert qwen.decode(sample.input_ids) == "北京 <|im_end|><|im_end|>"


def test_invalid_options_are_reported_together():
    with pytest.raises(ValueError, match="template='jinja' is unknown.*max_length=1 must be at least 2"):
        EncodeOptions(template="jinja", max_length=1)


# --------------------------------------------------------------------------- truncation


LONG = Conversation([Message("user", "first question " * 5), Message("assistant", "first answer " * 5),
                     Message("user", "second question"), Message("assistant", "second answer " * 10)],
                    system="Be brief.")


def test_truncation_drops_the_oldest_round_and_keeps_the_system(qwen):
    full = _encode(LONG, qwen, max_length=None)
    without_first = _encode(Conversation(LONG.messages[2:], system="Be brief."), qwen, max_length=None)
    stats = EncodeStats()
    sample = encode_conversation(LONG, qwen, EncodeOptions(max_length=without_first.num_tokens), stats)
    assert full.num_tokens > without_first.num_tokens
    assert sample.input_ids == without_first.input_ids and sample.labels == without_first.labels
    assert sample.truncated and stats.truncated == 1
    assert qwen.decode(sample.input_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nsecond")


def test_truncation_cuts_the_last_answers_tail(qwen):
    without_first = _encode(Conversation(LONG.messages[2:], system="Be brief."), qwen, max_length=None)
    sample = _encode(LONG, qwen, max_length=without_first.num_tokens - 5)
    assert sample.input_ids == without_first.input_ids[:-5]
    assert sample.labels == without_first.labels[:-5]
    assert sample.num_supervised == without_first.num_supervised - 4  # 4 answer tokens lost, plus the final "\n"


def test_prompt_longer_than_max_length_is_dropped_and_counted(qwen):
    stats = EncodeStats()
    assert encode_conversation(LONG, qwen, EncodeOptions(max_length=10), stats) is None
    assert stats.dropped == {"no_supervised_token_fits": 1} and stats.seen == 1


@pytest.mark.parametrize("template", ["qwen2.5", "tokenizer"])
def test_truncation_never_yields_zero_supervised_tokens(qwen, template):
    conv = CONVERSATIONS[1]
    full = _encode(conv, qwen, max_length=None, template=template)
    stats = EncodeStats()
    for max_length in range(2, full.num_tokens + 2):
        sample = encode_conversation(conv, qwen, EncodeOptions(max_length=max_length, template=template), stats)
        if sample is not None:
            assert 0 < sample.num_supervised and sample.num_tokens <= max_length
            assert sum(x != M for x in sample.labels[1:]) == sample.num_supervised
    assert stats.encoded + sum(stats.dropped.values()) == stats.seen
    assert stats.encoded > 0 and stats.dropped["no_supervised_token_fits"] > 0


def test_encode_conversations_skips_dropped_and_counts(qwen):
    convs = [TWO_TURNS, Conversation([Message("user", "q"), Message("assistant", "a", train=False)]), TWO_TURNS]
    stats = EncodeStats()
    samples = list(encode_conversations(convs, qwen, EncodeOptions(), stats))
    assert len(samples) == 2
    assert (stats.seen, stats.encoded, stats.tokens, stats.supervised_tokens) == (3, 2, 90, 12)
    assert "2/3 conversations encoded" in stats.summary()
