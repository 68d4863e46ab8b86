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


def test_lone_announced_item_runs_without_waiting_for_a_batch():
    """wait_for_announced: nothing else is in flight, so the item does not sit out max_wait_s (30 s here)."""
    mb = MicroBatcher(lambda xs: [x * 2 for x in xs], max_batch=8, max_wait_s=30.0, wait_for_announced=True)
    done = threading.Event()
    out = []

    def task():
        with mb.ticket() as predict:
            out.append(predict(21))
        done.set()

    threading.Thread(target=task, daemon=True).start()
    assert done.wait(10), "a lone item waited for a batch that nobody announced"
    assert out == [42] and mb.batches == [1] and mb.coming == 0


def test_announced_items_are_waited_for_and_batched():
    mb = MicroBatcher(lambda xs: [x * 2 for x in xs], max_batch=8, max_wait_s=30.0, wait_for_announced=True)
    second_ready = threading.Event()
    out = {}

    def task(i, delay):
        with mb.ticket() as predict:
            if delay:
                second_ready.wait(10)  # still "decoding" while the first is already queued
            out[i] = predict(i)

    first = threading.Thread(target=task, args=(1, False))
    slow = threading.Thread(target=task, args=(2, True))
    slow.start()  # announced first, submits last
    first.start()
    time.sleep(0.3)
    assert mb.batches == [], "the batcher ran before the announced item came"
    second_ready.set()
    first.join(10)
    slow.join(10)
    assert out == {1: 2, 2: 4} and mb.batches == [2]


def test_withdrawn_announcement_does_not_hold_the_batch():
    mb = MicroBatcher(lambda xs: xs, max_batch=8, max_wait_s=30.0, wait_for_announced=True)
    withdraw = threading.Event()
    result = []

    def failing_task():
        with mb.ticket():
            withdraw.wait(10)  # e.g. the image turned out not to be eligible: nothing is submitted

    def task():
        with mb.ticket() as predict:
            result.append(predict("x"))

    t1 = threading.Thread(target=failing_task)
    t1.start()
    t2 = threading.Thread(target=task)
    t2.start()
    time.sleep(0.2)
    assert not result, "the first item waits while the other is announced"
    withdraw.set()
    t2.join(10)
    assert result == ["x"] and mb.batches == [1] and mb.coming == 0
    with pytest.raises(RuntimeError, match="one item"):
        with mb.ticket() as predict:
            predict("y")
            predict("z")
