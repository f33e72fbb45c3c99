"""Show which tokens carry loss: the cheapest way to catch a label bug before training.

    print(preview(conversations, tokenizer, EncodeOptions(), n=3, color=sys.stdout.isatty()))

Trained spans are green on a terminal, or wrapped in [[double brackets]] when colour is off:

    --- conversation 0: 34 tokens, 3 supervised
    <|im_start|>system
    You are Qwen, ...<|im_end|>
    <|im_start|>user
    Hi<|im_end|>
    <|im_start|>assistant
    [[Hello!<|im_end|>]]
"""
from __future__ import annotations

import itertools
from typing import Iterable

from sft.conversation import Conversation
from sft.tokens.encoding import (
    IGNORE_INDEX,
    EncodedSample,
    EncodeOptions,
    EncodeStats,
    encode_conversation,
)

_GREEN, _RESET = "\033[42;30m", "\033[0m"


def render_sample(sample: EncodedSample, tokenizer, color: bool, title: str) -> str:
    open_mark, close_mark = (_GREEN, _RESET) if color else ("[[", "]]")
    header = f"--- {title}: {sample.num_tokens} tokens, {sample.num_supervised} supervised"
    if sample.truncated:
        header += " (truncated)"
    parts = []
    # Decode each run of equally-labelled tokens at once, so that characters spread over several
    # tokens (Chinese, emoji) come out whole.
    for trained, run in itertools.groupby(zip(sample.input_ids, sample.labels), key=lambda p: p[1] != IGNORE_INDEX):
        text = tokenizer.decode([tok for tok, _ in run], skip_special_tokens=False)
        parts.append(f"{open_mark}{text}{close_mark}" if trained else text)
    return header + "\n" + "".join(parts)


def preview(conversations: Iterable[Conversation], tokenizer, options: EncodeOptions | None = None,
            n: int = 3, color: bool = False) -> str:
    """Encode and render the first n conversations; a dropped one is listed with its reason."""
    stats = EncodeStats()
    blocks = []
    for k, conv in enumerate(itertools.islice(conversations, n)):
        sample = encode_conversation(conv, tokenizer, options, stats)
        if sample is None:
            blocks.append(f"--- conversation {k}: dropped ({stats.last_drop})\n")
        else:
            blocks.append(render_sample(sample, tokenizer, color, f"conversation {k}"))
    return "\n".join(blocks)
