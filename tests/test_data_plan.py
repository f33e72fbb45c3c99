"""Batch planning of the training stream: token-budget batches (--batch_tokens)."""
import random

import pytest

from sft.config import ConfigError, parse_config
from sft.data import StreamOptions, plan_batches, token_budget_batches


def _samples(lengths):
    return [{"input_ids": [1] * n, "labels": [1] * n, "id": f"s{i}"} for i, n in enumerate(lengths)]


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


def test_batch_tokens_flag_is_validated():
    with pytest.raises(ConfigError, match="--batch_tokens 100: needs --group_by_length true, no --packing"):
        parse_config(["--batch_tokens", "100", "--max_length", "512"])
    with pytest.raises(ConfigError, match="--batch_tokens"):
        parse_config(["--batch_tokens", "4096", "--packing", "true"])
    assert parse_config(["--batch_tokens", "2048", "--max_length", "512"]).data.batch_tokens == 2048
