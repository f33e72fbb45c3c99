"""Which encoded samples train together: one shuffle cycle's samples -> micro-batches.

    plan_batches(samples, options, rng)   # [[s3, s7, s1, s9], [s2, s5, s8, s4], ...]

Grouped by length (balanced padded tokens, or a token budget) or plain shuffled batches; the
collator (sft.tokens.collate) then pads or packs each batch.
"""
from __future__ import annotations

import logging
import random

from sft.tokens.collate import StreamOptions

logger = logging.getLogger(__name__)

def plan_batches(samples: list[dict], options: StreamOptions, rng: random.Random) -> list[list[dict]]:
    """Split one cycle's samples into micro-batches.

    Padded: shuffle, then (group_by_length) a stable sort by length so each batch holds similar
    lengths, then shuffle the batch order. Grouped batches are balanced by default: as many batches
    as batch_size samples each would give, but cut so each holds about the same padded tokens
    (balance_batches); or as many samples as fit batch_tokens padded tokens; or batch_size each.
    Packed: batch_size shuffled samples per batch, as without grouping (the collator packs them into
    rows), so packing changes the cost of a step but not which samples train together.
    """
    order = samples[:]
    rng.shuffle(order)
    grouped = options.group_by_length and not options.packing
    if grouped:
        order.sort(key=lambda s: len(s["input_ids"]))  # stable: ties keep the shuffled order
    if grouped and options.batch_tokens:
        batches = token_budget_batches(order, options.batch_tokens)
    elif grouped and options.balance_batches:
        batches = balanced_batches(order, -(-len(order) // options.batch_size))
    else:
        batches = [order[i:i + options.batch_size] for i in range(0, len(order), options.batch_size)]
    rng.shuffle(batches)
    return batches


def token_budget_batches(ordered: list[dict], budget: int) -> list[list[dict]]:
    """Cut length-sorted samples into batches of at most `budget` padded tokens (count x longest).

    Every step then carries about the same number of tokens, so with the per-step token mean each token
    weighs the same in the loss whatever the length of its sample (fixed-size batches of short samples
    would give their tokens several times the weight of tokens in batches of long ones). A sample longer
    than the budget gets a batch of its own.
    """
    batches: list[list[dict]] = []
    current: list[dict] = []
    longest = 0
    for sample in ordered:
        size = len(sample["input_ids"])
        if current and (len(current) + 1) * max(longest, size) > budget:
            batches.append(current)
            current, longest = [], 0
        current.append(sample)
        longest = max(longest, size)
    if current:
        batches.append(current)
    return batches


def balanced_batches(ordered: list[dict], n_batches: int) -> list[list[dict]]:
    """Cut length-sorted samples into `n_batches` contiguous batches with the smallest possible
    largest padded size (count x longest).

    Fixed-size batches of sorted samples make the batch of the longest samples several times the
    tokens (and memory) of the batch of the shortest, and under the per-step token mean a token in
    a short batch then weighs several times one in a long batch. Balanced batches keep the number of
    steps (batch_size samples per batch on average) while every batch carries about the same tokens.
    """
    if not ordered:
        return []
    lengths = [len(s["input_ids"]) for s in ordered]
    n_batches = max(1, min(n_batches, len(ordered)))

    def cut(budget: int) -> list[int]:  # greedy: the fewest contiguous batches within the budget
        starts, longest = [0], 0
        for i, size in enumerate(lengths):
            if i > starts[-1] and (i - starts[-1] + 1) * max(longest, size) > budget:
                starts.append(i)
                longest = 0
            longest = max(longest, size)
        return starts

    low, high = max(lengths), max(lengths) * len(lengths)  # binary search the smallest feasible budget
    while low < high:
        middle = (low + high) // 2
        if len(cut(middle)) <= n_batches:
            high = middle
        else:
            low = middle + 1
    starts = cut(low)
    bounds = list(zip(starts, starts[1:] + [len(lengths)]))
    while len(bounds) < n_batches:  # fewer were needed: halve the largest until the count is exact
        i = max((i for i, (a, b) in enumerate(bounds) if b - a > 1),
                key=lambda i: (bounds[i][1] - bounds[i][0]) * lengths[bounds[i][1] - 1])
        a, b = bounds[i]
        bounds[i:i + 1] = [(a, (a + b) // 2), ((a + b) // 2, b)]
    return [ordered[a:b] for a, b in bounds]


