"""A micro-batcher: task threads hand in one image each; one thread runs the model on up to ``max_batch`` of them
at a time, waiting at most ``max_wait_s`` for a batch to fill. This is how an inference worker batches across
queued Celery tasks while every task keeps its own ``acks_late`` acknowledgement.

With ``wait_for_announced``, the batcher waits only for work it knows is coming: a task takes a ``ticket()`` when it
starts (before it decodes its image) and submits through it. A lone CXR (nothing else in flight) then runs at once,
with no ``max_wait_s`` added to its latency, while a backlog still forms full batches (the other task threads are
decoding, so their images are worth the wait)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Ticket(Generic[T, R]):
    """Work announced to a ``MicroBatcher``; call it with the item (once) to submit and wait for the result."""

    def __init__(self, batcher: MicroBatcher[T, R]) -> None:
        self._batcher, self._open = batcher, True

    def _close(self) -> None:
        if self._open:
            self._open = False
            self._batcher._announced(-1)

    def __call__(self, item: T, timeout: float | None = None) -> R:
        if not self._open:
            raise RuntimeError("a ticket submits one item")
        fut = self._batcher._enqueue(item)  # queued before it stops counting as coming: never a gap in between
        self._close()
        return fut.result(timeout)


class MicroBatcher(Generic[T, R]):
    def __init__(self, fn: Callable[[list[T]], list[R]], max_batch: int = 8, max_wait_s: float = 0.05,
                 wait_for_announced: bool = False) -> None:
        self.fn, self.max_batch, self.max_wait_s = fn, max(1, max_batch), max_wait_s
        self.wait_for_announced = wait_for_announced
        self._q: queue.Queue[tuple[T, Future]] = queue.Queue()
        self._coming = 0
        self._lock = threading.Lock()
        self.batches: list[int] = []  # sizes of the batches run (for tests and metrics)
        threading.Thread(target=self._run, name="micro-batcher", daemon=True).start()

    def submit(self, item: T, timeout: float | None = None) -> R:
        return self._enqueue(item).result(timeout)

    def _enqueue(self, item: T) -> Future:
        fut: Future = Future()
        self._q.put((item, fut))
        return fut

    def _announced(self, delta: int) -> None:
        with self._lock:
            self._coming += delta

    @property
    def coming(self) -> int:
        """Tickets taken and not yet submitted (or given up)."""
        return self._coming

    @contextmanager
    def ticket(self) -> Iterator[Ticket[T, R]]:
        """Announce an item before preparing it; the ticket submits it. Leaving the block without submitting (the
        task failed or skipped its image) withdraws the announcement."""
        self._announced(+1)
        t: Ticket[T, R] = Ticket(self)
        try:
            yield t
        finally:
            t._close()

    def _worth_waiting(self) -> bool:
        return not self.wait_for_announced or self._coming > 0

    def _run(self) -> None:
        while True:
            batch = [self._q.get()]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._q.get_nowait())
                    continue
                except queue.Empty:
                    pass
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._worth_waiting():
                    break
                try:  # short waits while announced work is still being prepared (it may be withdrawn)
                    batch.append(self._q.get(timeout=min(remaining, 0.002) if self.wait_for_announced
                                             else remaining))
                except queue.Empty:
                    if not self.wait_for_announced:
                        break
            self.batches.append(len(batch))
            try:
                results = self.fn([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} inputs")
            except BaseException as exc:  # every waiting task learns of the failure
                for _, fut in batch:
                    fut.set_exception(exc)
                continue
            for (_, fut), res in zip(batch, results):
                fut.set_result(res)
