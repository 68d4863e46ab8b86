"""Celery app factory and submission. The receiver submits by task *name*: it never imports workers/ or torch."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from kombu import Queue

from .config import Config
from .errors import SpoolError

log = logging.getLogger(__name__)

ANALYZE_TASK = "triage.analyze"
REPORT_TASK = "triage.report"


def make_app(cfg: Config, name: str = "triage_node") -> Celery:
    """A Celery app wired the way the node needs it: JSON only, late acks, prefetch 1, two queues."""
    if not cfg.broker.url:
        raise SpoolError("no broker URL configured (triage-node up starts a private Redis and sets one)")
    app = Celery(name, broker=cfg.broker.url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_queues=(Queue(cfg.broker.infer_queue), Queue(cfg.broker.report_queue)),
        task_routes={
            ANALYZE_TASK: {"queue": cfg.broker.infer_queue},
            REPORT_TASK: {"queue": cfg.broker.report_queue},
        },
        task_default_queue=cfg.broker.infer_queue,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        broker_transport_options={
            "visibility_timeout": cfg.broker.visibility_timeout,
            "socket_connect_timeout": 3,
            "socket_timeout": 10,
            "max_retries": 1,
        },
        worker_hijack_root_logger=False,
        worker_send_task_events=cfg.broker.task_events,
        task_send_sent_event=cfg.broker.task_events,
        task_track_started=True,
    )
    return app


def submit(app: Celery, path: str, sop_instance_uid: str, received_at: float, **extra: Any) -> str:
    """Enqueue the analysis of one spooled instance. Raises SpoolError when the broker cannot take it."""
    payload = {"path": path, "sop_instance_uid": sop_instance_uid, "received_at": received_at, **extra}
    try:
        res = app.send_task(ANALYZE_TASK, args=[payload], retry=True,
                            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5,
                                          "interval_max": 1.0})
    except Exception as exc:  # kombu OperationalError, redis errors, socket errors
        raise SpoolError(f"broker unavailable: {type(exc).__name__}") from exc
    return res.id


#: kombu's Redis transport keeps one list per queue and priority step, and delivered-but-unacknowledged messages
#: (a task being worked on, a retry waiting for its countdown) in this hash until the worker acknowledges them.
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")
_UNACKED_KEY = "unacked"


def _sop_of(msg: dict) -> str | None:
    """The SOP Instance UID in a kombu message dict of one of our tasks (payload = first positional argument)."""
    import base64
    import json

    body = msg["body"]
    if msg.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    args = json.loads(body)[0]
    return args[0].get("sop_instance_uid") if args and isinstance(args[0], dict) else None


def broker_held_sops(cfg: Config, include_unacked: bool = True) -> set[str] | None:
    """SOP Instance UIDs that a task in the broker still refers to: queued (either queue) and, with
    ``include_unacked``, delivered to a worker and not yet acknowledged. None when the broker cannot be read (then the
    caller must assume nothing is held). Leave the unacknowledged out when no worker of before can be alive (a
    private broker at start-up): kombu hands those back only after the visibility timeout.

    The lists and the hash are read in one transaction. What remains is kombu's own hand-over: a message a worker
    has popped from a list and not yet recorded as unacknowledged is in neither for that instant; the sweep then
    re-enqueues it once, which costs a no-op task (outputs are deterministic), never a lost instance.
    """
    import json

    import redis

    if not cfg.broker.url.startswith(("redis://", "rediss://", "unix://")):
        return None
    try:
        client = redis.Redis.from_url(cfg.broker.url, socket_timeout=30, socket_connect_timeout=3)
        # One MULTI/EXEC: a snapshot of every list and the unacked hash at one instant. Read one after another, an
        # analyze task that finished in between (report task queued after its list was read, analyze task acked
        # before the hash was read) was in neither, and the sweep re-enqueued it (seen once in 3,000 under load).
        pipe = client.pipeline(transaction=True)
        for queue in (cfg.broker.infer_queue, cfg.broker.report_queue):
            for suffix in _PRIORITY_SUFFIXES:
                pipe.lrange(queue + suffix, 0, -1)
        if include_unacked:
            pipe.hvals(_UNACKED_KEY)
        replies = pipe.execute()
        messages: list[dict] = [json.loads(raw) for reply in replies[:2 * len(_PRIORITY_SUFFIXES)] for raw in reply]
        if include_unacked:
            messages += [json.loads(raw)[0] for raw in replies[-1]]  # [message, exchange, routing key]
    except Exception as exc:  # redis down, auth, wrong URL, unexpected layout: reconcile re-enqueues instead
        log.warning("cannot list the broker's tasks (%s): reconcile re-enqueues every old spool file",
                    type(exc).__name__)
        return None
    held: set[str] = set()
    for msg in messages:
        try:
            sop = _sop_of(msg)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            continue  # not one of our tasks: it holds nothing we could re-enqueue
        if sop:
            held.add(sop)
    return held
