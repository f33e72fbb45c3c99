"""sft.tokens.prefetch.PrefetchStream: batches read ahead on a thread, the checkpoint position from the consumed count."""
import json
import time
from itertools import islice

import pytest

from sft.data.sources import parse_sources
from sft.tokens.collate import StreamOptions
from sft.tokens.encoding import EncodeOptions
from sft.tokens.prefetch import PrefetchStream
from sft.tokens.stream import TrainStream

OPTIONS = StreamOptions(batch_size=2, shuffle_buffer=10, max_length=64, seed=3)


def _data(tmp_path, n=60):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"input": f"question {i} " + "x" * (i % 7), "target": f"answer {i}"}) + "\n"
                            for i in range(n)))
    return [str(path)]


def _stream(specs, tokenizer):
    return TrainStream(parse_sources(specs), tokenizer, EncodeOptions(max_length=64), OPTIONS)


def _position(state):
    """What a resume reads back (the counters are statistics, not the position)."""
    return {k: v for k, v in json.loads(json.dumps(state)).items() if k != "counters"}


def _wait_until(condition, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the prefetch thread did not read ahead"
        time.sleep(0.01)


@pytest.mark.parametrize("done", [7, 23])  # mid-cycle (5 batches a cycle) with the reader in the next cycles
def test_the_checkpoint_position_is_the_consumed_batch_not_the_prefetched_one(done, tmp_path, qwen_tokenizer):
    specs = _data(tmp_path)
    straight = _stream(specs, qwen_tokenizer)
    batches = list(islice(iter(straight), 40))
    expected = straight.state_at(done)

    ahead = PrefetchStream(_stream(specs, qwen_tokenizer), depth=8)
    loop = iter(ahead)  # alive, as the Trainer's DataLoader holds it (a dropped iterator stops the reader)
    consumed = list(islice(loop, done))
    # The reader is 8 batches further (one or two cycles ahead of the last consumed batch) ...
    _wait_until(lambda: ahead.stream.counters["records"] >= 2 * (done + 8))
    state = ahead.state_at(done)
    ahead.stop()
    assert [b["sample_ids"] for b in consumed] == [b["sample_ids"] for b in batches[:done]]
    # ... and the saved position is still the one of the last consumed batch.
    assert _position(state) == _position(expected)
    assert state["batches"] == done

    resumed = PrefetchStream(_stream(specs, qwen_tokenizer), depth=3)
    resumed.load_state(json.loads(json.dumps(state)))
    assert [b["sample_ids"] for b in islice(iter(resumed), 40 - done)] == [b["sample_ids"] for b in batches[done:]]
    resumed.stop()


class _SlowStream:
    """3 items, 50 ms each, then an error (or the end)."""

    def __init__(self, fail: bool):
        self.fail, self.reading = fail, False

    def __iter__(self):
        for i in range(3):
            time.sleep(0.05)
            yield i
        if self.fail:
            raise ValueError("train.jsonl line 4: broken record")


def test_depth_zero_reads_in_the_loop_and_counts_the_wait():
    data = PrefetchStream(_SlowStream(fail=False), depth=0)
    assert list(data) == [0, 1, 2]
    assert data.waited() >= 0.15
    assert data._producer is None  # no reader thread was started


def test_a_reading_error_is_raised_in_the_training_loop_with_its_message():
    data = PrefetchStream(_SlowStream(fail=True), depth=2)
    got = []
    with pytest.raises(ValueError, match="train.jsonl line 4: broken record"):
        for item in data:
            got.append(item)
    assert got == [0, 1, 2]


def test_a_new_iteration_ends_the_previous_reader_thread():
    data = PrefetchStream(_SlowStream(fail=False), depth=2)
    first = iter(data)
    assert next(first) == 0
    old_thread = data._producer[0]
    second = iter(data)
    assert next(second) == 0
    assert not old_thread.is_alive()
    data.stop()
    assert data._producer is None


def test_depth_must_be_a_non_negative_int():
    with pytest.raises(ValueError, match="depth=-1; expected an int >= 0"):
        PrefetchStream(_SlowStream(fail=False), depth=-1)
