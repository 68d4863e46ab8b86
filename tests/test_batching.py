"""The micro-batcher groups concurrent submissions, respects max batch and wait, and propagates failures."""

from __future__ import annotations

import threading
import time

import pytest

from triage_node.batching import MicroBatcher


def test_concurrent_submissions_are_batched_and_answered_in_order():
    calls = []

    def double(xs):
        calls.append(list(xs))
        time.sleep(0.05)
        return [2 * x for x in xs]

    mb = MicroBatcher(double, max_batch=4, max_wait_s=0.2)
    out = {}
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, mb.submit(i))) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert out == {i: 2 * i for i in range(10)}
    assert max(mb.batches) == 4 and sum(mb.batches) == 10 and len(mb.batches) <= 5


def test_a_lone_item_waits_at_most_max_wait():
    mb = MicroBatcher(lambda xs: xs, max_batch=64, max_wait_s=0.05)
    t0 = time.monotonic()
    assert mb.submit("x") == "x"
    assert time.monotonic() - t0 < 2.0 and mb.batches == [1]


def test_failure_reaches_every_task_in_the_batch_and_batcher_survives():
    def boom(xs):
        if "bad" in xs:
            raise ValueError("model failed")
        return xs

    mb = MicroBatcher(boom, max_batch=8, max_wait_s=0.01)
    with pytest.raises(ValueError, match="model failed"):
        mb.submit("bad")
    assert mb.submit("good") == "good"
