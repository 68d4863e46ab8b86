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
        worker_send_task_events=True,
        task_send_sent_event=True,
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
