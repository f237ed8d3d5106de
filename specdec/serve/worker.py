"""The one thread that owns the engine: a bounded queue in front, batches out.

Requests (`Job`) wait in a queue of at most ``max_queue``; `submit` past that raises
`QueueFull` at once (the app answers 429), so nothing ever waits unbounded. The worker takes
up to ``max_batch`` waiting jobs, runs them as one batched ``engine.generate`` call, and the
engine's stream callback hands every committed token to its job's asyncio queue with
``loop.call_soon_threadsafe``. A batch runs to completion; jobs arriving meanwhile wait for the
next one.

Cancellation (a client that went away): a waiting job is dropped when the worker reaches it;
a job in the running batch ends at the engine's next step: the stream callback returns True for
it, the engine drops that row (finish_reason "abort") and the other rows decode on unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from specdec.serve.metrics import ServerMetrics

log = logging.getLogger("specdec.serve")


class QueueFull(Exception):
    """The waiting queue holds max_queue jobs already."""


class NotRunning(Exception):
    """The worker is not started or is shutting down."""


# What a job's event queue receives, in order: ("tokens", [ids]) any number of times, then one
# of ("done", GenerationResult), ("error", message) or ("cancelled", None).
Event = tuple[str, Any]


@dataclass
class Job:
    prompt_ids: list[int]
    params: Any  # SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrival: float = field(default_factory=time.perf_counter)
    started: float | None = None
    first_token: float | None = None
    last_token: float | None = None

    def post(self, kind: str, payload: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is closed: the server is gone, nobody listens
            pass

    def cancel(self) -> None:
        self.cancelled.set()


class EngineWorker:
    """Owns `engine`; call `start()` once, `submit(job)` from the event loop, `stop()` at exit."""

    def __init__(self, engine, max_batch: int = 8, max_queue: int = 64,
                 metrics: ServerMetrics | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics or ServerMetrics()
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batches = 0  # batches run so far
        self.metrics.track_queue(lambda: len(self._running), lambda: len(self._waiting))

    # ----------------------------------------------------------------------------- control

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                raise RuntimeError("the worker is already started")
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="specdec-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new jobs, fail the waiting ones, cancel the running batch, join the thread."""
        with self._cond:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), deque()
            for job in self._running:
                job.cancel()
            self._cond.notify_all()
        for job in waiting:
            job.post("error", "the server is shutting down")
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the engine thread did not stop within %.0f s", timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull / NotRunning at once."""
        with self._cond:
            if not self.alive:
                raise NotRunning("the engine worker is not running")
            if len(self._waiting) >= self.max_queue:
                self.metrics.request_rejected.labels(reason="queue_full").inc()
                raise QueueFull(
                    f"the server is at capacity ({len(self._running)} requests running, "
                    f"{len(self._waiting)} waiting, max queue {self.max_queue}); retry later"
                )
            self._waiting.append(job)
            self._cond.notify()

    # ------------------------------------------------------------------------------ thread

    def _take_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                if self._stopping:
                    return None
                batch: list[Job] = []
                while self._waiting and len(batch) < self.max_batch:
                    job = self._waiting.popleft()
                    if job.cancelled.is_set():
                        self.metrics.request_aborted.inc()
                        job.post("cancelled")
                        continue
                    batch.append(job)
                if batch:
                    self._running = batch
                    return batch
                self._cond.wait()

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            try:
                self._run_batch(batch)
            finally:
                with self._cond:
                    self._running = []
                self.batches += 1

    def _run_batch(self, batch: list[Job]) -> None:
        metrics = self.metrics
        start = time.perf_counter()
        for job in batch:
            job.started = start
            metrics.request_queue_time.observe(start - job.arrival)

        def on_tokens(index: int, token_ids: list[int]) -> bool:
            job = batch[index]
            now = time.perf_counter()
            if job.first_token is None:
                metrics.time_to_first_token.observe(now - job.arrival)
                job.first_token = now
            else:
                metrics.inter_token_latency.observe(now - job.last_token)
            job.last_token = now
            metrics.generation_tokens.inc(len(token_ids))
            if job.cancelled.is_set():
                return True  # the engine ends this row; the others go on
            job.post("tokens", list(token_ids))
            return False

        try:
            results = self.engine.generate(
                [job.prompt_ids for job in batch], [job.params for job in batch], stream=on_tokens
            )
        except Exception as exc:  # noqa: BLE001 - reported to every request; the worker lives on
            log.exception("engine.generate failed for a batch of %d", len(batch))
            for job in batch:
                metrics.request_failed.inc()
                job.post("error", f"the engine failed: {type(exc).__name__}: {exc}")
            return
        end = time.perf_counter()
        for job, result in zip(batch, results):
            if job.cancelled.is_set():
                metrics.request_aborted.inc()
                job.post("cancelled")
                continue
            metrics.record_result(result)
            metrics.e2e_request_latency.observe((job.last_token or end) - job.arrival)
            job.post("done", result)
