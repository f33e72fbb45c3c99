"""sft.train.collator.training_collator: the collate_fn the Trainer gets in production."""
import json

import torch

from sft.train.collator import BatchStats, SampleIdLog, training_collator


def stream_batch():
    """A micro-batch as sft.tokens.stream yields it (pre-collated; packed, so with padding_tokens)."""
    return {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 0]]), "labels": torch.tensor([[-100, 6, 7, -100, 9, -100]]),
            "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0]]), "use_cache": False, "padding_tokens": 1,
            "sample_ids": ["a.jsonl:1", "a.jsonl:2"]}


def test_unwraps_and_records(tmp_path):
    stats, log = BatchStats(), SampleIdLog(str(tmp_path / "ids.jsonl"), accumulation=1)
    batch = stream_batch()
    out = training_collator(stats, log)([batch])
    assert set(out) == {"input_ids", "labels", "position_ids", "use_cache"}
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(out[key], batch[key])
    assert out["use_cache"] is False
    assert "sample_ids" in batch and "padding_tokens" in batch  # the stream's batch itself is left alone
    assert stats.pop(1) == {"real_tokens": 5, "supervised_tokens": 3, "padded_tokens": 1, "samples": 2}
    log.on_step_end(None, type("State", (), {"global_step": 1})(), None)
    assert json.loads((tmp_path / "ids.jsonl").read_text()) == {"step": 1, "ids": ["a.jsonl:1", "a.jsonl:2"]}


def test_eval_batches_are_not_counted(tmp_path):
    stats, log = BatchStats(), SampleIdLog(str(tmp_path / "ids.jsonl"), accumulation=1)
    eval_batch = {"input_ids": torch.tensor([[1, 2, 0]]), "attention_mask": torch.tensor([[1, 1, 0]]),
                  "labels": torch.tensor([[-100, 2, -100]])}  # build_eval_batches: no sample ids
    out = training_collator(stats, log)([eval_batch])
    assert torch.equal(out["attention_mask"], eval_batch["attention_mask"])
    assert len(stats) == 0 and log.pending == []


def test_refuses_a_dataloader_batch_of_several_items():
    import pytest

    with pytest.raises(ValueError, match="per-DataLoader batch size must be 1, got 2"):
        training_collator(BatchStats(), SampleIdLog(None, 1))([stream_batch(), stream_batch()])


def test_the_training_summary_reports_true_samples_and_tokens_per_second(tmp_path):
    """The Trainer counts one sample per micro-batch (the stream's batch size is 1): the summary is corrected."""
    from types import SimpleNamespace

    from sft.train.collator import ThroughputCallback

    stats, log = BatchStats(), SampleIdLog(None, accumulation=1)
    callback = ThroughputCallback(stats)
    args = SimpleNamespace(world_size=1, device="cpu")
    callback.on_train_begin(args, None, None)
    collate = training_collator(stats, log)
    for _ in range(3):  # three steps of one micro-batch, 2 samples and 5 real tokens each
        collate([stream_batch()])
        callback.on_step_end(args, None, SimpleNamespace(should_evaluate=False))
    summary = {"train_runtime": 2.0, "train_samples_per_second": 1.5, "train_loss": 1.0}
    callback.on_log(args, None, None, logs=summary)
    assert summary["train_samples_per_second"] == 3.0 and summary["train_tokens_per_second"] == 7.5


def test_the_log_carries_the_share_of_step_time_spent_waiting_for_data(monkeypatch):
    from types import SimpleNamespace

    import sft.train.collator as collator_module
    from sft.train.collator import ThroughputCallback

    clock = [100.0]
    monkeypatch.setattr(collator_module.time, "perf_counter", lambda: clock[0])
    waited = [3.0]  # seconds waited before this window: not counted
    stats = BatchStats()
    stats.data_wait = lambda: waited[0]
    callback = ThroughputCallback(stats)
    args = SimpleNamespace(world_size=1, device="cpu")
    callback.on_train_begin(args, None, None)
    collate = training_collator(stats, SampleIdLog(None, 1))
    for _ in range(2):  # two 2-second steps, 0.25 s of each spent waiting for the batch
        collate([stream_batch()])
        clock[0] += 2.0
        waited[0] += 0.25
        callback.on_step_end(args, None, SimpleNamespace(should_evaluate=False))
    logs = {"loss": 1.0}
    callback.on_log(args, None, None, logs=logs)
    assert logs["data_wait_share"] == 0.125
    assert logs["tokens_per_second"] == 2.5  # 10 real tokens in 4 s


def test_without_a_wait_clock_the_log_has_no_wait_share():
    from types import SimpleNamespace

    from sft.train.collator import ThroughputCallback

    stats = BatchStats()
    callback = ThroughputCallback(stats)
    args = SimpleNamespace(world_size=1, device="cpu")
    callback.on_train_begin(args, None, None)
    training_collator(stats, SampleIdLog(None, 1))([stream_batch()])
    callback.on_step_end(args, None, SimpleNamespace(should_evaluate=False))
    logs = {"loss": 1.0}
    callback.on_log(args, None, None, logs=logs)
    assert "data_wait_share" not in logs and "tokens_per_second" in logs
