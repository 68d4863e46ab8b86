"""A micro-batcher: task threads hand in one image each; one thread runs the model on up to ``max_batch`` of them
at a time, waiting at most ``max_wait_s`` for a batch to fill. This is how an inference worker batches across
queued Celery tasks while every task keeps its own ``acks_late`` acknowledgement."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    def __init__(self, fn: Callable[[list[T]], list[R]], max_batch: int = 8, max_wait_s: float = 0.05) -> None:
        self.fn, self.max_batch, self.max_wait_s = fn, max(1, max_batch), max_wait_s
        self._q: queue.Queue[tuple[T, Future]] = queue.Queue()
        self.batches: list[int] = []  # sizes of the batches run (for tests and metrics)
        threading.Thread(target=self._run, name="micro-batcher", daemon=True).start()

    def submit(self, item: T, timeout: float | None = None) -> R:
        fut: Future = Future()
        self._q.put((item, fut))
        return fut.result(timeout)

    def _run(self) -> None:
        while True:
            batch = [self._q.get()]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    batch.append(self._q.get(timeout=remaining))
                except queue.Empty:
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
