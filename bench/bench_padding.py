"""Padding fraction of each batching mode on the same encoded data.

    python bench/bench_padding.py [--n 4000] [--batch_size 8] [--buffer_size 1024] [--max_length 2048]

Data: synthetic Chinese conversations with lognormal message lengths (70% single-turn, 30% with 2-5
turns), encoded with the real Qwen2.5 tokenizer and the qwen2.5 template. The batches come from the
training stream's own planner (sft.tokens.plan.plan_batches), one shuffle buffer at a time. Modes:
    none       --group_by_length false: batches of batch_size in shuffled order
    fixed      --balance_batches false: buffer sorted by length, batch_size samples per batch
    balanced   the default: same number of batches, about equal padded tokens each
    tokens     --batch_tokens batch_size x mean length
    packed     --packing: the shuffled batches of "none", each packed into rows as long as its longest
               sample (sdpa/eager); with flash attention one row each, no padding at all
Padding fraction = padded positions / all positions the model computes. "largest batch" is the
padded positions of the biggest micro-batch (what sets peak activation memory).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from sft.conversation import Conversation, Message
from sft.models import load_tokenizer
from sft.tokens.collate import StreamOptions, collate_batch, padding_fraction
from sft.tokens.encoding import EncodeOptions, EncodeStats, encode_conversations
from sft.tokens.plan import plan_batches

# Common characters and punctuation: enough for realistic Qwen token/char ratios (~1.3-1.5 chars/token).
_CHARS = ("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面"
          "而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把"
          "性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质"
          "气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活"
          "设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则")
_PUNCT = "，，，。。？！、：；"


def _text(rng: random.Random, mean_chars: float, sigma: float = 0.9) -> str:
    n = max(2, min(6000, int(rng.lognormvariate(0, sigma) * mean_chars)))
    return "".join(rng.choice(_PUNCT) if rng.random() < 0.08 else rng.choice(_CHARS) for _ in range(n))


def synthetic_conversations(n: int, seed: int = 0) -> list[Conversation]:
    rng = random.Random(seed)
    convs = []
    for _ in range(n):
        turns = 1 if rng.random() < 0.7 else rng.randint(2, 5)
        messages = []
        for _ in range(turns):
            messages += [Message("user", _text(rng, 40)), Message("assistant", _text(rng, 150))]
        convs.append(Conversation(messages, system=None if rng.random() < 0.8 else _text(rng, 20, 0.3)))
    return convs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4000, help="conversations")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--buffer_size", type=int, default=1024, help="group_by_length shuffle buffer")
    parser.add_argument("--max_length", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    tokenizer = load_tokenizer("qwen2.5")
    stats = EncodeStats()
    start = time.perf_counter()
    samples = list(encode_conversations(synthetic_conversations(args.n, args.seed), tokenizer,
                                        EncodeOptions(template="qwen2.5", max_length=args.max_length), stats))
    encode_s = time.perf_counter() - start
    lengths = sorted(s.num_tokens for s in samples)
    print(f"{stats.summary()}  ({encode_s:.1f} s, {len(samples) / encode_s:.0f} conversations/s)")
    print(f"tokens per sample: mean {statistics.mean(lengths):.0f}, median {lengths[len(lengths) // 2]}, "
          f"p90 {lengths[int(len(lengths) * 0.9)]}, max {lengths[-1]}")

    real = sum(lengths)
    bs = args.batch_size
    rows = [{"input_ids": s.input_ids, "labels": s.labels, "id": i} for i, s in enumerate(samples)]
    mean_tokens = int(bs * statistics.mean(lengths))
    modes = {
        "none (shuffled order)": StreamOptions(batch_size=bs, group_by_length=False),
        "grouped, fixed size": StreamOptions(batch_size=bs, balance_batches=False),
        "grouped, balanced (default)": StreamOptions(batch_size=bs),
        f"grouped, --batch_tokens {mean_tokens}": StreamOptions(batch_size=bs, batch_tokens=mean_tokens),
        "packed": StreamOptions(batch_size=bs, packing=True, max_length=args.max_length),
    }
    print(f"\n| mode (buffer {args.buffer_size}) | batches | samples per batch | padding fraction "
          "| positions computed / real tokens | largest batch, positions |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, options in modes.items():
        rng = random.Random(args.seed)
        batches = [batch for start in range(0, len(rows), args.buffer_size)
                   for batch in plan_batches(rows[start:start + args.buffer_size], options, rng)]
        collated = [collate_batch(b, tokenizer, options) for b in batches]  # what training computes
        sizes = [c["input_ids"].numel() for c in collated]
        positions = sum(sizes)
        frac = sum(padding_fraction(c) * n for c, n in zip(collated, sizes)) / positions
        print(f"| {name} | {len(batches)} | {len(rows) / len(batches):.1f} (max {max(map(len, batches))}) "
              f"| {frac:.1%} | {positions / real:.2f} | {max(sizes)} |")

if __name__ == "__main__":
    main()
