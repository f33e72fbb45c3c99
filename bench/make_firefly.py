"""Write a synthetic Firefly-like JSONL file ({"kind", "input", "target"}, Chinese text), fast and seeded.

    python bench/make_firefly.py --rows 1100000 --output bench/out/firefly-1.1M.jsonl

Lengths follow log-normal laws fitted to look like firefly-train-1.1M: input median ~100 characters,
target median ~200, long tail to several thousand. All 24 kinds appear, BELLE/OpenQA most often.
~1% of rows repeat an earlier row (Firefly has duplicates too), so exact dedup has work to do.
Text is sliced from one pre-generated pool of common CJK characters, punctuation, some ASCII, quotes
and newlines (to exercise JSON escaping), which keeps generation to a few seconds per million rows.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import orjson

KINDS = ("ProseGeneration", "MRC", "JinYongGeneration", "TextCorrection", "ClassicalChinese", "BELLE",
         "StoryGeneration", "Couplet", "Cot", "Dictionary", "Translation", "Program", "SentimentAnalyze",
         "OpenQA", "AncientPoem", "TextMatching", "NLI", "Summary", "KeywordRecognition", "ProductDesc",
         "LyricGeneration", "Composition", "MusicComment", "NER")
WEIGHTS = np.array([4, 6, 2, 3, 5, 30, 3, 4, 4, 2, 6, 5, 3, 20, 4, 3, 3, 5, 2, 3, 3, 4, 2, 3], dtype=float)
PROMPTS = {
    "Couplet": "根据上联给出下联：", "Translation": "把下面的句子翻译成英文：", "Summary": "请为下面的文章写一个摘要：",
    "NER": "找出下面句子中的人名和地名：", "SentimentAnalyze": "判断下面评论的情感倾向：",
    "ClassicalChinese": "把这句话翻译成现代文：", "AncientPoem": "以“春天”为题写一首古诗：",
    "Program": "用Python写一个函数：", "KeywordRecognition": "抽取出下面文本的关键词：",
}
POOL_CHARS = 8_000_000


def make_pool(rng: np.random.Generator) -> str:
    common = rng.choice(np.arange(0x4E00, 0x9FA6), size=3500, replace=False)
    zipf = 1.0 / np.arange(1, common.size + 1)
    codes = rng.choice(common, size=POOL_CHARS, p=zipf / zipf.sum()).astype(np.uint32)
    # (characters, relative weight): punctuation often, ASCII, quotes and newlines now and then
    groups = [("，", 30), ("。", 20), ("！？", 3), ("、", 8), ("；：", 2), ("“”（）《》", 1),
              ("0123456789", 1), ("abcdefghijkAB ", 1), ('"', 1), ("\n", 2)]
    extras = np.array([ord(c) for chars, _ in groups for c in chars], dtype=np.uint32)
    weights = np.array([w for chars, w in groups for _ in chars], dtype=float)
    spots = rng.random(POOL_CHARS) < 0.12
    codes[spots] = rng.choice(extras, size=int(spots.sum()), p=weights / weights.sum())
    return codes.tobytes().decode("utf-32-le")


def lognormal_lengths(rng: np.random.Generator, n: int, median: float, sigma: float, cap: int) -> np.ndarray:
    return np.clip(rng.lognormal(np.log(median), sigma, n), 2, cap).astype(np.int64)


def generate(rows: int, output: str, seed: int = 0, dup_rate: float = 0.01, block: int = 100_000,
             length_scale: float = 1.0) -> None:
    """length_scale multiplies the median lengths (0.25: alpaca-zh-like short instructions)."""
    rng = np.random.default_rng(seed)
    pool = make_pool(rng)
    limit = len(pool) - 10_000
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    dumps = orjson.dumps
    recent: list[bytes] = []
    with open(output, "wb", buffering=1 << 22) as f:
        for start in range(0, rows, block):
            n = min(block, rows - start)
            kinds = rng.choice(len(KINDS), size=n, p=WEIGHTS / WEIGHTS.sum())
            in_len = lognormal_lengths(rng, n, 100 * length_scale, 0.85, 6000)
            out_len = lognormal_lengths(rng, n, 200 * length_scale, 1.0, 8000)
            in_at = rng.integers(0, limit, n)
            out_at = rng.integers(0, limit, n)
            dup = rng.random(n) < dup_rate
            lines = []
            for i in range(n):
                if dup[i] and recent:
                    lines.append(recent[int(in_at[i]) % len(recent)])
                    continue
                kind = KINDS[kinds[i]]
                a, b = int(in_at[i]), int(out_at[i])
                text = PROMPTS.get(kind, "") + pool[a:a + int(in_len[i])]
                line = dumps({"kind": kind, "input": text, "target": pool[b:b + int(out_len[i])]})
                lines.append(line)
                if i % 97 == 0:
                    recent.append(line)
            f.write(b"\n".join(lines) + b"\n")
            recent = recent[-5000:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_100_000)
    p.add_argument("--output", default="bench/out/firefly-1.1M.jsonl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dup_rate", type=float, default=0.01)
    p.add_argument("--length_scale", type=float, default=1.0, help="Scale the median lengths (0.25: short SFT data).")
    a = p.parse_args(argv)
    t = time.perf_counter()
    generate(a.rows, a.output, a.seed, a.dup_rate, length_scale=a.length_scale)
    size = os.path.getsize(a.output)
    print(f"wrote {a.rows} rows, {size / 1e9:.2f} GB to {a.output} in {time.perf_counter() - t:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
