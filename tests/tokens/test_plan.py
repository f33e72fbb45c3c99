"""Batch planning of the training stream (sft.tokens.plan.plan_batches): which samples share a micro-batch.

Modes: stream order (--group_by_length false), length-grouped with balanced batches (the default),
length-grouped with batch_size samples each (--balance_batches false), a padded-token budget
(--batch_tokens N), and packed rows (--packing).
"""
import random
from collections import Counter

import pytest

from sft.config import ConfigError, parse_config
from sft.tokens.collate import StreamOptions
from sft.tokens.plan import balanced_batches, plan_batches, token_budget_batches


def _samples(lengths):
    return [{"input_ids": [1] * n, "labels": [1] * n, "id": f"s{i}"} for i, n in enumerate(lengths)]


def _lengths(n, seed=0, low=1, high=200):
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(n)]


def _padded(batch):  # positions the model computes for a padded batch
    return len(batch) * max(len(s["input_ids"]) for s in batch)


def _padding_fraction(batches):
    real = sum(len(s["input_ids"]) for b in batches for s in b)
    return 1 - real / sum(_padded(b) for b in batches)


def _ids(batches):
    return Counter(s["id"] for b in batches for s in b)


def test_fixed_grouping_keeps_every_sample_once_and_cuts_padding():
    samples = _samples(_lengths(1000))
    options = StreamOptions(batch_size=8, group_by_length=True, balance_batches=False)
    grouped = plan_batches(samples, options, random.Random(1))
    assert _ids(grouped) == Counter(s["id"] for s in samples)
    assert [len(b) for b in grouped] == [8] * 125
    ungrouped = plan_batches(samples, StreamOptions(batch_size=8, group_by_length=False), random.Random(1))
    assert _ids(ungrouped) == _ids(grouped)
    assert _padding_fraction(grouped) < 0.05 < 0.3 < _padding_fraction(ungrouped)


def test_grouped_plans_are_deterministic_and_shuffle_the_batch_order():
    samples = _samples(_lengths(100))
    for balance in (False, True):
        options = StreamOptions(batch_size=4, group_by_length=True, balance_batches=balance)
        first = plan_batches(samples, options, random.Random(3))
        assert plan_batches(samples, options, random.Random(3)) == first  # exact resume replans the same
        assert plan_batches(samples, options, random.Random(4)) != first
        longest = [max(len(s["input_ids"]) for s in b) for b in first]
        assert longest != sorted(longest)  # batch order is shuffled, not short-to-long


def test_fixed_grouping_keeps_a_last_partial_batch():
    options = StreamOptions(batch_size=2, group_by_length=True, balance_batches=False)
    assert sorted(len(b) for b in plan_batches(_samples([3, 1, 2, 5, 4]), options, random.Random(0))) == [1, 2, 2]


def test_balanced_batches_literal():
    def sizes(lengths, n):
        return [[len(s["input_ids"]) for s in b] for b in balanced_batches(_samples(sorted(lengths)), n)]

    # Largest padded batch is 20 tokens at best ([20] alone); short samples fill up to that.
    assert sizes([3, 3, 3, 4, 5, 9, 10, 20], 3) == [[3, 3, 3, 4, 5], [9, 10], [20]]
    # Equal lengths: the count is exact (3 batches), the largest has 4 samples.
    assert sizes([5] * 10, 3) == [[5, 5, 5, 5], [5, 5, 5, 5], [5, 5]]
    assert sizes([1, 2, 3, 100], 4) == [[1], [2], [3], [100]]
    assert sizes([1, 2, 3, 100], 9) == [[1], [2], [3], [100]]  # never more batches than samples
    assert balanced_batches([], 3) == []


def test_balanced_plan_keeps_the_step_count_and_evens_out_tokens():
    samples = _samples(_lengths(1000, seed=5, low=20, high=512))
    balanced = plan_batches(samples, StreamOptions(batch_size=8, group_by_length=True), random.Random(2))
    fixed = plan_batches(samples, StreamOptions(batch_size=8, group_by_length=True, balance_batches=False),
                         random.Random(2))
    assert _ids(balanced) == Counter(s["id"] for s in samples)
    assert len(balanced) == len(fixed) == 125  # batch_size samples per batch on average, as before
    sizes = [len(b) for b in balanced]
    assert max(sizes) > 8 * 3 and min(sizes) < 8  # many short samples together, few long ones
    for plan in (balanced, fixed):
        for batch in plan:  # each batch is one contiguous run of the length order
            lengths = sorted(len(s["input_ids"]) for s in batch)
            others = [len(s["input_ids"]) for b in plan if b is not batch for s in b]
            assert not any(lengths[0] < n < lengths[-1] for n in others)
    spread = [_padded(b) for b in balanced]
    fixed_spread = [_padded(b) for b in fixed]
    assert max(spread) < 0.7 * max(fixed_spread)  # peak memory follows the largest batch
    assert max(spread) / min(spread) < 1.5 < 10 < max(fixed_spread) / min(fixed_spread)
    assert _padding_fraction(balanced) < 0.05


def test_packed_plan_batches_the_same_samples_as_no_grouping():
    samples = _samples(_lengths(300, seed=7))
    packed = plan_batches(samples, StreamOptions(batch_size=8, packing=True), random.Random(0))
    plain = plan_batches(samples, StreamOptions(batch_size=8, group_by_length=False), random.Random(0))
    assert packed == plain  # the collator packs; which samples train together does not change
    assert _ids(packed) == Counter(s["id"] for s in samples)
    assert _padding_fraction(plain) > 0.3


def test_token_budget_batches_literal():
    batches = token_budget_batches(_samples([3, 3, 3, 4, 5, 9, 10, 20]), budget=12)
    assert [[len(s["input_ids"]) for s in b] for b in batches] == [[3, 3, 3], [4, 5], [9], [10], [20]]


def test_plan_with_batch_tokens_keeps_every_sample_once_within_budget():
    rng = random.Random(0)
    lengths = [rng.randint(5, 200) for _ in range(300)]
    options = StreamOptions(batch_size=8, group_by_length=True, batch_tokens=400, max_length=200)
    batches = plan_batches(_samples(lengths), options, random.Random(1))
    ids = [s["id"] for b in batches for s in b]
    assert sorted(ids) == sorted(f"s{i}" for i in range(300))
    for batch in batches:
        assert len(batch) * max(len(s["input_ids"]) for s in batch) <= 400
    sizes = {len(b) for b in batches}
    assert max(sizes) > 8 and min(sizes) < 8  # short samples share a batch, long ones get fewer companions
    assert plan_batches(_samples(lengths), options, random.Random(1)) == batches  # deterministic (exact resume)


def test_stream_options_follow_the_flags():
    from sft.train.run import stream_options_for

    default = stream_options_for(parse_config([]))
    assert default.group_by_length and default.balance_batches and not default.packing
    assert not default.pack_one_row  # sdpa: packed rows as long as the longest sample
    assert not stream_options_for(parse_config(["--balance_batches", "false"])).balance_batches
    flash = stream_options_for(parse_config(["--packing", "true", "--attn_implementation", "flash_attention_2"],
                                            check_machine=False))  # flash-attn is not installed here
    assert flash.packing and flash.pack_one_row and flash.flash_kwargs
    flex = stream_options_for(parse_config(["--packing", "true", "--attn_implementation", "flex_attention"]))
    assert flex.packing and flex.pack_one_row and not flex.flash_kwargs  # flex reads the boundaries from position_ids


def test_flash_attention_without_flash_attn_names_flex_attention(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "flash_attn" else real(name))
    with pytest.raises(ConfigError, match="flash_attention_2 needs the flash-attn package .* use --attn_implementation "
                                          "flex_attention"):
        parse_config(["--packing", "true", "--attn_implementation", "flash_attention_2"])


def test_packing_with_prompt_tuning_is_refused():
    with pytest.raises(ConfigError, match="--packing with --finetuning_type prompt_tuning.*use --packing false"):
        parse_config(["--packing", "true", "--finetuning_type", "prompt_tuning"])


def test_batch_tokens_flag_is_validated():
    with pytest.raises(ConfigError, match="--batch_tokens 100: needs --group_by_length true, no --packing"):
        parse_config(["--batch_tokens", "100", "--max_length", "512"])
    with pytest.raises(ConfigError, match="--batch_tokens"):
        parse_config(["--batch_tokens", "4096", "--packing", "true"])
    assert parse_config(["--batch_tokens", "2048", "--max_length", "512"]).data.batch_tokens == 2048
