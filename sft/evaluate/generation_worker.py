"""One model, one generation at a time, for `serve`: jobs run in a single worker thread, in arrival order.

    worker = GenerationWorker(model, tokenizer, max_queue=64)
    job = Job(ids=[...], max_new_tokens=64, stop_strings=["\\n\\n"])
    result = await worker.run(job, on_text=lambda delta: ...)   # Finished(text, num_tokens, finish)
    job.cancel.set()                                            # from anywhere: stops before the next token

Why one thread: the model is shared, and a CPU runs one forward pass well, not two half as fast. Requests
queue in the executor; each answer is the same as the same prompt sent alone (no padding, no batching).
A cancelled job (client gone, shutdown) stops at the next token; one still waiting never starts.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch

from sft.evaluate.inference import generate, stop_token_ids
from sft.evaluate.openai_api import TOOL_CALL_START, ApiError
from sft.evaluate.options import GenerationOptions

logger = logging.getLogger(__name__)


@dataclass
class Job:
    ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_strings: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_new_tokens (benchmarks)
    hold_tool_calls: bool = False  # streamed text stops at a "<tool_call>" (it is sent as tool_calls at the end)
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class Finished:
    text: str
    num_tokens: int
    finish: str  # "stop" | "length" | "cancelled"


@dataclass
class WorkerStats:
    waiting: int = 0
    running: int = 0
    finished: int = 0
    cancelled: int = 0
    cancelled_tokens: list[int] = field(default_factory=list)  # tokens generated before each cancel (last 100)
    completion_tokens: int = 0


class _Cancelled:
    """StoppingCriteria: stop when the job is cancelled (checked between tokens)."""

    def __init__(self, cancel: threading.Event):
        self.cancel = cancel

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.cancel.is_set(), dtype=torch.bool, device=input_ids.device)


class _TextTracker:
    """The streamer generate() feeds: decodes the new tokens, finds stop strings, emits safe text deltas."""

    def __init__(self, tokenizer, job: Job, stops: list[int], on_text: Callable[[str], None] | None):
        self.tokenizer, self.job, self.stops, self.on_text = tokenizer, job, set(stops), on_text
        self.ids: list[int] = []
        self.text, self.sent, self.prompt_seen, self.stopped_by, self.stop_token = "", 0, False, None, False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        if self.stopped_by is not None:
            return
        token = int(value.reshape(-1)[0])
        if token in self.stops:
            self.stopped_by, self.stop_token = "stop", True
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        self.text = text
        cut = min((text.find(s) for s in self.job.stop_strings if s in text), default=-1)
        if cut >= 0:
            self.text, self.stopped_by = text[:cut], "stop"
            self.job.cancel.set()  # stops generate() before the next token
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        if self.on_text is None:
            return
        safe = len(self.text) if final else len(self.text) - self._held_back()
        if self.job.hold_tool_calls and TOOL_CALL_START in self.text:
            safe = min(safe, self.text.index(TOOL_CALL_START))
        if safe > self.sent:
            self.on_text(self.text[self.sent:safe])
            self.sent = safe

    def _held_back(self) -> int:
        """Characters at the end that may be the start of a stop string (or of "<tool_call>")."""
        prefixes = list(self.job.stop_strings) + ([TOOL_CALL_START] if self.job.hold_tool_calls else [])
        return max((k for s in prefixes for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)


class GenerationWorker:
    """Runs Jobs one at a time on a dedicated thread; `run` awaits one from the event loop."""

    def __init__(self, model, tokenizer, max_queue: int = 64):
        self.model, self.tokenizer, self.max_queue = model, tokenizer, max_queue
        self.stops = stop_token_ids(tokenizer)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.stats = WorkerStats()
        self.closing = False
        self._jobs: dict[int, Job] = {}  # queued or running, by id(): what close() must cancel

    def admit(self) -> None:
        """Raise the 503 a new request gets while shutting down or with a full queue (checked before a stream's
        headers go out, and again when the job is queued)."""
        if self.closing:
            raise ApiError(503, "the server is shutting down; retry on another instance", code="shutting_down",
                           kind="server_error")
        if self.stats.waiting >= self.max_queue:
            raise ApiError(503, f"{self.stats.waiting} requests are already waiting for the model (--max_queue); "
                           "retry later", code="queue_full", kind="server_error")

    async def run(self, job: Job, on_text: Callable[[str], None] | None = None) -> Finished:
        """Queue `job`; on_text(delta) runs on the event loop as text arrives. Cancelling the awaiting task
        cancels the job (the worker thread is never interrupted mid-token)."""
        self.admit()
        loop = asyncio.get_running_loop()
        emit = None
        if on_text is not None:
            def emit(delta: str) -> None:
                try:
                    loop.call_soon_threadsafe(on_text, delta)
                except RuntimeError:  # the loop is gone (shutdown): nobody listens any more
                    job.cancel.set()
        self.stats.waiting += 1
        self._jobs[id(job)] = job
        future = self.executor.submit(self._generate, job, emit)
        try:
            return await asyncio.wrap_future(future)
        except BaseException:
            job.cancel.set()
            raise
        finally:
            self._jobs.pop(id(job), None)

    def close(self) -> None:
        """Refuse new jobs, cancel every queued and running one (the running one stops at its next token), wait
        for the worker thread. Called once the server's grace period is over: whatever is left is cancelled here,
        not by the request tasks, which may not get to run again (this call blocks the event loop)."""
        self.closing = True
        for job in list(self._jobs.values()):
            job.cancel.set()
        self.executor.shutdown(wait=True, cancel_futures=True)

    def _generate(self, job: Job, emit: Callable[[str], None] | None) -> Finished:
        self.stats.waiting -= 1
        if job.cancel.is_set() or self.closing:
            self.stats.cancelled += 1
            return Finished("", 0, "cancelled")
        self.stats.running += 1
        tracker = _TextTracker(self.tokenizer, job, self.stops, emit)
        try:
            options = GenerationOptions(max_new_tokens=job.max_new_tokens, do_sample=job.temperature > 0,
                                        temperature=job.temperature or 1.0, top_p=job.top_p)
            if job.seed is not None:
                torch.manual_seed(job.seed)
            input_ids = torch.tensor([job.ids], device=self.model.device)
            from transformers import StoppingCriteriaList

            with torch.inference_mode():
                generate(self.model, self.tokenizer, input_ids, torch.ones_like(input_ids), options, self.stops,
                         streamer=tracker, stopping_criteria=StoppingCriteriaList([_Cancelled(job.cancel)]),
                         min_new_tokens=job.max_new_tokens if job.ignore_eos else 0)
        finally:
            self.stats.running -= 1
        if tracker.stopped_by is None and job.cancel.is_set():
            self.stats.cancelled += 1
            self.stats.cancelled_tokens = (self.stats.cancelled_tokens + [len(tracker.ids)])[-100:]
            return Finished(tracker.text, len(tracker.ids), "cancelled")
        self.stats.finished += 1
        count = len(tracker.ids) + tracker.stop_token  # the turn-end token is generated too (as in batch/eval)
        self.stats.completion_tokens += count
        return Finished(tracker.text, count, "stop" if tracker.stopped_by else "length")
