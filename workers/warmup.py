"""Warm a worker up before its first task, so the first CXR after a start waits for nothing but its own work.

Inference workers load the model and run it once on a blank image (imports, weights, the first-call kernels: ~10 s
on a busy 2-core CPU otherwise spent on the first instance); report workers import the encoders and build nothing.
Where it happens: in the prefork child after the fork (CUDA must not be initialised in the parent), in a thread, or
in the worker process itself for the threads/solo pools. A failure here is logged and left to the first task, which
reports it through the normal failure path (a broken model package is an operator problem that ``/readyz`` shows).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery.signals import celeryd_after_setup, worker_process_init, worker_ready

log = logging.getLogger("workers.warmup")
_role: dict[str, Any] = {"queues": set(), "pool": ""}


def warm(cfg: Any, queues: set[str]) -> float:
    """Load what the tasks of ``queues`` need; returns the seconds it took."""
    t0 = time.perf_counter()
    if cfg.broker.infer_queue in queues:
        import numpy as np

        from triage_node import pipeline

        model = pipeline.get_model(cfg)
        model.predict([np.zeros((256, 256), dtype=np.float32)])
    if cfg.broker.report_queue in queues:
        from triage_node import encoding  # noqa: F401  (highdicom and the encoders: ~0.3 s on first use)
    return time.perf_counter() - t0


def _warm_here() -> None:
    from triage_node import config

    cfg = config.load()
    try:
        took = warm(cfg, _role["queues"])
        log.info("warmed up for %s in %.1f s", ",".join(sorted(_role["queues"])) or "-", took)
    except Exception as exc:  # the first task meets it again and goes through the failure path
        log.error("warm-up failed (%s: %s); the first task will report it", type(exc).__name__, exc)


@celeryd_after_setup.connect
def _record_role(sender: Any = None, instance: Any = None, **_: Any) -> None:
    app = instance.app if instance is not None else None
    if app is not None:
        _role["queues"] = set(app.amqp.queues.consume_from or app.amqp.queues)
        _role["pool"] = instance.pool_cls.__module__ if hasattr(instance, "pool_cls") else ""


@worker_process_init.connect
def _warm_child(**_: Any) -> None:
    """Prefork child, after the fork. In a thread: Celery kills a child that has not said it is up within
    ``worker_proc_alive_timeout`` (4 s), and loading the model can take longer on a busy CPU; a task that arrives
    meanwhile waits for the same load (``pipeline.get_model`` is serialised), never for a second one."""
    threading.Thread(target=_warm_here, name="warm-up", daemon=True).start()


@worker_ready.connect
def _warm_in_process(**_: Any) -> None:  # threads / solo: tasks run in this process
    if "prefork" not in str(_role["pool"]):
        _warm_here()
