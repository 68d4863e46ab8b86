"""The receiver's direct enqueue writes the message Celery's ``send_task`` writes (real Redis), and a real Celery
consumer takes it as the analyze task with its payload."""

from __future__ import annotations

import json

import redis

from triage_node import config
from triage_node.enqueue import MARKER_PREFIX, RedisSubmitter
from triage_node.queue import ANALYZE_TASK, make_app, submit


def _normalised(raw: bytes) -> dict:
    msg = json.loads(raw)
    for key in ("id", "root_id", "origin"):
        msg["headers"][key] = None
    for key in ("correlation_id", "reply_to", "delivery_tag"):
        msg["properties"][key] = None
    return msg


def test_direct_message_equals_celery_send_task(redis_url):
    cfg = config.Config(broker=config.BrokerConfig(url=redis_url))
    client = redis.Redis.from_url(redis_url)
    submit(make_app(cfg, name="receiver"), "/spool/1.2.3.dcm", "1.2.3", 1700000000.5)
    celery_msg = client.lpop("infer")
    task_id = RedisSubmitter(cfg)("/spool/1.2.3.dcm", "1.2.3", 1700000000.5)
    ours = client.lpop("infer")
    assert _normalised(ours) == _normalised(celery_msg)
    parsed = json.loads(ours)
    assert parsed["headers"]["id"] == parsed["headers"]["root_id"] == parsed["properties"]["correlation_id"] == task_id
    assert client.get(MARKER_PREFIX + "1.2.3") == task_id.encode()  # the queued-marker, same transaction


def test_celery_consumer_receives_the_task(redis_url):
    """A kombu consumer with Celery's app (what a worker runs) decodes name, id and payload."""
    cfg = config.Config(broker=config.BrokerConfig(url=redis_url))
    task_id = RedisSubmitter(cfg)("/spool/1.2.4.dcm", "1.2.4", 1700000001.0)
    app = make_app(cfg, name="worker-side")
    got = []
    with app.connection_for_read() as conn:
        queue = app.amqp.queues[cfg.broker.infer_queue]
        with conn.Consumer(queue, accept=["json"], callbacks=[lambda body, m: (got.append((body, m)), m.ack())]):
            conn.drain_events(timeout=10)
    body, message = got[0]
    assert message.headers["task"] == ANALYZE_TASK and message.headers["id"] == task_id
    args, kwargs, _embed = body
    assert args == [{"path": "/spool/1.2.4.dcm", "sop_instance_uid": "1.2.4", "received_at": 1700000001.0}]
    assert kwargs == {}


def test_paused_or_absent_broker_is_a_spool_error(tmp_path):
    import pytest

    from triage_node.errors import SpoolError
    from triage_node.services import free_port

    cfg = config.Config(broker=config.BrokerConfig(url=f"redis://127.0.0.1:{free_port()}/0"))
    sub = RedisSubmitter(cfg)
    with pytest.raises(SpoolError, match="broker unavailable"):
        sub("/x.dcm", "1.2.5", 0.0)
    with pytest.raises(SpoolError):
        sub.is_queued("1.2.5")
