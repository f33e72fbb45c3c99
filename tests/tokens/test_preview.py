
from sft.conversation import Conversation, Message
from sft.tokens.encoding import EncodeOptions, encode_conversation
from sft.tokens.preview import preview, render_sample

CONVS = [
    Conversation([Message("user", "Hi"), Message("assistant", "Hello!")], system="S"),
    Conversation([Message("user", "q"), Message("assistant", "a", train=False)]),
    Conversation([Message("user", "你好"), Message("assistant", "\n你好😀"), Message("user", "再见"),
                  Message("assistant", "再见")], system="S"),
]


def test_preview_marks_trained_spans_without_colour(qwen):
    assert preview(CONVS, qwen, EncodeOptions(), n=3, color=False) == (
        "--- conversation 0: 19 tokens, 3 supervised\n"
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "[[Hello!<|im_end|>]]\n"
        "\n--- conversation 1: dropped (no_trained_turn)\n"
        "\n--- conversation 2: 32 tokens, 6 supervised\n"
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
        "[[\n你好😀<|im_end|>]]\n<|im_start|>user\n再见<|im_end|>\n<|im_start|>assistant\n[[再见<|im_end|>]]\n"
    )


def test_preview_shows_only_n_conversations(qwen):
    assert preview(iter(CONVS), qwen, n=1).count("--- conversation") == 1


def test_colour_uses_ansi_codes(qwen):
    text = preview(CONVS[:1], qwen, color=True)
    assert "\033[42;30mHello!<|im_end|>\033[0m" in text and "[[" not in text


def test_render_sample_reports_truncation(qwen):
    sample = encode_conversation(CONVS[0], qwen, EncodeOptions(max_length=16))
    assert render_sample(sample, qwen, color=False, title="sample 0") == (
        "--- sample 0: 16 tokens, 1 supervised (truncated)\n"
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n[[Hello]]"
    )
