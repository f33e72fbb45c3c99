"""Encode training batches ahead of the model, on a thread, without changing what a checkpoint stores.

    data = PrefetchStream(stream, depth=4)   # an IterableDataset over the same micro-batches, in the same order
    Trainer(train_dataset=data, ...)
    data.state_at(step * accumulation)       # the position after the batches the Trainer consumed
    data.waited()                            # seconds the training loop has spent waiting for a batch

Why a thread: the DataLoader runs with num_workers=0 (the collator must record token statistics in the
training process, and the stream's position lives there), so without this every shuffle buffer is read
and tokenized inside the training loop. Tokenizers (Rust) and file reads release the GIL, so a thread
overlaps them with the GPU's work; a worker process would need the position sent back.

Exact resume: a checkpoint's position is computed from the number of batches the Trainer consumed
(TrainStream.state_at(step x accumulation)), never from how far the reader got, so batches prefetched
but not trained are read again after a resume. The producer holds a lock while it advances the stream,
and state_at takes it, so the position is never read while the stream rewrites its cycle table.

depth 0 reads on the caller's thread (no thread), still measuring the wait.
"""
from __future__ import annotations

import queue
import threading
import time
from contextlib import contextmanager

import torch

_END = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class PrefetchStream(torch.utils.data.IterableDataset):
    """`stream`'s items, `depth` of them prepared ahead on a background thread (0: none)."""

    def __init__(self, stream, depth: int):
        super().__init__()
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"PrefetchStream: depth={depth!r}; expected an int >= 0 (0 reads without a thread)")
        self.stream, self.depth = stream, depth
        self._lock = threading.Lock()  # held while the stream advances (its cycle table changes then)
        self._wait = 0.0
        self._waiting = False
        self._producer: tuple[threading.Thread, threading.Event] | None = None

    # ---- what a run reads from its stream

    def state_at(self, batches_consumed: int) -> dict:
        with self._lock:
            return self.stream.state_at(batches_consumed)

    def load_state(self, state: dict) -> None:
        self.stop()  # the next iteration starts at the loaded position
        self.stream.load_state(state)

    @property
    def reading(self) -> bool:
        """True while the training loop waits for data (a signal then stops at once: no step is running)."""
        return self._waiting if self.depth else self.stream.reading

    def waited(self) -> float:
        """Seconds the consumer has spent waiting for batches since this object was made."""
        return self._wait

    # ---- iteration

    def __iter__(self):
        self.stop()  # a new DataLoader (e.g. full_then_lora's second phase): one producer at a time
        if self.depth == 0:
            yield from self._timed(iter(self.stream))
            return
        items: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(items, stop), name="sft-prefetch", daemon=True)
        self._producer = (thread, stop)
        thread.start()
        try:
            while True:
                with self._waiting_for_data():
                    item = items.get()
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    raise item.error
                yield item
        finally:
            stop.set()

    def stop(self) -> None:
        """End the background reader (if any) and wait for it."""
        if self._producer is None:
            return
        thread, stop = self._producer
        stop.set()
        thread.join()
        self._producer = None

    @contextmanager
    def _waiting_for_data(self):
        """The training loop waits for its next batch in this block: timed, and `reading` is True."""
        self._waiting = True
        start = time.perf_counter()
        try:
            yield
        finally:
            self._wait += time.perf_counter() - start
            self._waiting = False

    def _timed(self, iterator):
        while True:
            with self._waiting_for_data(), self._lock:
                item = next(iterator, _END)
            if item is _END:
                return
            yield item

    def _produce(self, items: queue.Queue, stop: threading.Event) -> None:
        iterator = iter(self.stream)
        try:
            while not stop.is_set():
                try:
                    with self._lock:
                        item = next(iterator, _END)
                except BaseException as err:  # handed to the consumer, raised on the training thread
                    item = _Failed(err)
                if not _put(items, item, stop) or item is _END or isinstance(item, _Failed):
                    return
        finally:
            with self._lock:
                iterator.close()


def _put(items: queue.Queue, item, stop: threading.Event) -> bool:
    """Put unless stopped (the consumer may be gone: a finished Trainer never reads again)."""
    while not stop.is_set():
        try:
            items.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False
