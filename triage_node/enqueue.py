"""Enqueue on the receiver's hot path: the analyze task message Celery would publish, as one Redis LPUSH.

``celery.send_task`` costs the receiver 1-3 ms per instance (producer pool, ``ensure`` wrappers, and a second
publish for the ``task-sent`` event); the handler is on the association's critical path, so that was a third of the
per-instance time at one association. The message itself (protocol 2: headers, properties, base64 JSON body) is
built by Celery's own ``amqp.as_task_v2``, so a worker cannot tell the difference; ``tests/test_enqueue.py`` checks
the message against the one ``send_task`` writes, and the end-to-end tests run real workers on it. Brokers other
than Redis go through ``queue.submit``.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from typing import Any

from .config import Config
from .errors import SpoolError
from .queue import ANALYZE_TASK, make_app, submit

log = logging.getLogger(__name__)
#: Redis key prefix of the "a task for this SOP Instance UID was queued" markers, and their lifetime.
MARKER_PREFIX = "triage:queued:"
MARKER_TTL_S = 86400


def is_redis(url: str) -> bool:
    return url.startswith(("redis://", "rediss://", "unix://"))


class RedisSubmitter:
    """``submit(path, sop_instance_uid, received_at) -> task id``; raises SpoolError when the broker cannot take it.

    Thread-safe (redis-py's connection pool); one instance per receiver process.
    """

    def __init__(self, cfg: Config, socket_timeout: float = 5.0) -> None:
        import redis
        from celery.utils.nodenames import anon_nodename
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.app = make_app(cfg, name="receiver")
        self.queue = cfg.broker.infer_queue
        self.extra = source_extra(cfg)
        self.origin = anon_nodename()
        # One immediate retry on a broken pooled connection (a broker restart); a paused broker costs at most
        # ``socket_timeout`` before the sender is answered 0xA700.
        self.client = redis.Redis.from_url(cfg.broker.url, socket_timeout=socket_timeout, socket_connect_timeout=3,
                                           retry=Retry(NoBackoff(), 1),
                                           retry_on_error=[redis.ConnectionError])

    def message(self, path: str, sop_instance_uid: str, received_at: float, **extra: Any) -> tuple[str, bytes]:
        """(task id, the kombu/Redis JSON message) for one analyze task."""
        task_id = str(uuid.uuid4())
        payload = {"path": path, "sop_instance_uid": sop_instance_uid, "received_at": received_at, **extra}
        tm = self.app.amqp.as_task_v2(task_id, ANALYZE_TASK, args=[payload], kwargs={}, origin=self.origin,
                                      root_id=task_id, reply_to=self.app.thread_oid, ignore_result=None)
        body = base64.b64encode(json.dumps(tm.body).encode()).decode()
        props = dict(tm.properties)
        props.update({"delivery_mode": 2, "delivery_info": {"exchange": "", "routing_key": self.queue},
                      "priority": 0, "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())})
        msg = {"body": body, "content-encoding": "utf-8", "content-type": "application/json",
               "headers": tm.headers, "properties": props}
        return task_id, json.dumps(msg).encode()

    def __call__(self, path: str, sop_instance_uid: str, received_at: float) -> str:
        """Queue the task and, in the same transaction, a marker saying a task for this instance was queued."""
        task_id, msg = self.message(path, sop_instance_uid, received_at, **self.extra)
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.lpush(self.queue, msg)
            pipe.set(MARKER_PREFIX + sop_instance_uid, task_id, ex=MARKER_TTL_S)
            pipe.execute()
        except Exception as exc:  # ConnectionError, TimeoutError, AuthenticationError, ResponseError (OOM)...
            raise SpoolError(f"broker unavailable: {type(exc).__name__}") from exc
        return task_id

    def is_queued(self, sop_instance_uid: str) -> bool:
        """Whether a task for this instance was queued (within the marker's lifetime). A file already in the spool
        without one was left by a receiver that died between the spool write and the enqueue: a resent copy must
        be queued, not treated as a duplicate. Raises SpoolError when the broker cannot be read."""
        try:
            return bool(self.client.exists(MARKER_PREFIX + sop_instance_uid))
        except Exception as exc:
            raise SpoolError(f"broker unavailable: {type(exc).__name__}") from exc


def source_extra(cfg: Config) -> dict[str, str]:
    """What every analyze task carries beside the spool path: ``source_url``, the base URL of this receiver's
    instance server, when ``[instances] url`` is set (workers on other hosts fetch the bytes there)."""
    return {"source_url": cfg.instances.url.rstrip("/")} if cfg.instances.url else {}


def make_submitter(cfg: Config):
    """The fastest submit function for the configured broker."""
    if is_redis(cfg.broker.url):
        return RedisSubmitter(cfg)
    app = make_app(cfg, name="receiver")
    extra = source_extra(cfg)
    return lambda path, sop, t0: submit(app, path, sop, t0, **extra)
