"""Tiny synthetic ShareGPT conversations for the training tests and bench/soak_kill.py.

Record i asks "q{i} ..." and answers with words picked by i, so every record differs and lengths vary
with i; the callers choose the word list and the length pattern their assertions were written for.
"""
from __future__ import annotations

import json
from pathlib import Path


def write_toy_conversations(path: Path, n: int, words: list[str], question: tuple[int, int, int] = (7, 3, 11),
                            answer: tuple[int, int, int] = (3, 2, 13)) -> Path:
    """Write n one-turn conversations to `path` (JSON lines) and return it.

    question / answer = (stride, base, span): text i is `base + i % span` words, starting at word
    `i * stride` of `words` (cycling).
    """
    def text(i: int, stride: int, base: int, span: int) -> str:
        return " ".join(words[(i * stride + k) % len(words)] for k in range(base + i % span))

    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"conversations": [{"from": "human", "value": f"q{i} {text(i, *question)}"},
                                                  {"from": "gpt", "value": text(i, *answer)}]},
                               ensure_ascii=False) + "\n")
    return path
