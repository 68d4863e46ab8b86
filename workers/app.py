"""Celery worker entry point.

    celery -A workers.app worker -Q infer  --pool=prefork --concurrency=1   # one process per GPU (or CPU)
    celery -A workers.app worker -Q report --pool=threads --concurrency=4   # I/O: build results, send, retry

Configuration comes from ``TRIAGE_CONFIG`` / ``TRIAGE_*`` (see triage_node.config). Tasks are thin adapters:
serialisation, retry/no-retry decisions and audit; the work is in ``triage_node.pipeline``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from triage_node import config, pipeline
from triage_node.audit import Audit
from triage_node.errors import BadDataset, ModelError, NotEligible, SendFailed
from triage_node.inference.types import Prediction
from triage_node.queue import ANALYZE_TASK, REPORT_TASK, make_app
from triage_node.spool import Spool, atomic_write

log = logging.getLogger("workers")
logging.getLogger("highdicom").setLevel(logging.WARNING)
cfg = config.load()
app = make_app(cfg, name="workers")
spool = Spool(cfg.spool.directory, cfg.retry.dead_letter_dir, cfg.spool.max_disk_usage)
audit = Audit(cfg.audit_log)


_batcher = None
_batcher_lock = threading.Lock()


def _predict():
    """Image -> Prediction; through a shared micro-batcher when the worker runs several task threads."""
    global _batcher
    if cfg.model.batch_size <= 1:
        return None
    with _batcher_lock:
        if _batcher is None:
            from triage_node.batching import MicroBatcher

            def run(images):
                preds = pipeline.get_model(cfg).predict(images)
                for p in preds:
                    p.timings_ms["batch"] = len(images)
                return preds

            _batcher = MicroBatcher(run, cfg.model.batch_size, cfg.model.batch_wait_ms / 1000)
    return _batcher.submit


@app.task(name=ANALYZE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def analyze(self, payload: dict) -> dict:
    """Infer queue: decode + model. Hands a small JSON prediction to the report queue."""
    sop = payload["sop_instance_uid"]
    path = Path(payload["path"])
    base = {"sop_instance_uid": sop, "task_id": self.request.id}
    if not path.exists():
        # Finished by an earlier delivery of the same instance (redelivery after a crash, or a duplicate).
        audit.record("analyze_noop", reason="spool file already processed", **base)
        return {"status": "noop"}
    t0 = time.time()
    audit.record("analyze_started", redelivered=bool(self.request.delivery_info.get("redelivered")), **base)
    try:
        pred = pipeline.analyze(path, cfg, predict=_predict(),
                                display_to=spool.outbox_dir(sop) / pipeline.DISPLAY_CACHE)  # decoded once per node
    except NotEligible as exc:
        audit.record("skipped", reason=str(exc), **base)
        spool.discard(sop)
        return {"status": "skipped", "reason": str(exc)}
    except BadDataset as exc:
        audit.record("failed", reason=str(exc), stage="analyze", **base)
        spool.dead_letter(sop, f"bad dataset: {exc}", extra={"stage": "analyze"})
        return {"status": "failed", "reason": str(exc)}
    except ModelError as exc:
        # A broken model package is an operator problem: keep the instance and let another worker try.
        audit.record("failed", reason=f"model: {exc}", stage="analyze", **base)
        raise
    audit.record("analysed", probability=round(pred.probability, 4), positive=pred.positive,
                 boxes=len(pred.detections), model=pred.model.label, ms=round((time.time() - t0) * 1000, 1),
                 batch=int(pred.timings_ms.get("batch", 1)),
                 hostname=self.request.hostname, **base)
    app.send_task(REPORT_TASK, args=[{**payload, "prediction": pred.to_json(), "analysed_at": time.time()}])
    return {"status": "analysed", "positive": pred.positive}


def _backoff(attempt: int) -> float:
    return min(cfg.retry.backoff_base_s * (2 ** attempt), cfg.retry.backoff_max_s)


@app.task(name=REPORT_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def report(self, payload: dict) -> dict:
    """Report queue: build SR/SC/GSPS once into the outbox, deliver, retry with backoff, then dead-letter."""
    sop = payload["sop_instance_uid"]
    base = {"sop_instance_uid": sop, "task_id": self.request.id, "attempt": self.request.retries + 1}
    box = spool.outbox_dir(sop)
    state_file = box / "sent.json"
    prediction = Prediction.from_json(payload["prediction"])
    if not (box / "prediction.json").exists():
        source = Path(payload["path"])
        if not source.exists():
            audit.record("report_noop", reason="already delivered", **base)
            return {"status": "noop"}
        try:
            pipeline.build(source, prediction, cfg, box)
        except BadDataset as exc:
            audit.record("failed", reason=str(exc), stage="report", **base)
            spool.dead_letter(sop, f"bad dataset: {exc}", extra={"stage": "report"})
            return {"status": "failed"}
        except OSError as exc:
            # spool full / unwritable: transient. Never let Celery ack a failed task with the instance still spooled
            # (it would sit in spool/instances until a restart): retry with backoff, then dead-letter with the reason.
            import shutil

            shutil.rmtree(box, ignore_errors=True)  # a half-written outbox must not pass for a built one
            reason = f"outbox write failed: {exc.strerror or type(exc).__name__}"
            if self.request.retries + 1 < cfg.retry.max_attempts:
                delay = _backoff(self.request.retries)
                audit.record("retry", reason=reason, delay_s=delay, **base)
                raise self.retry(countdown=delay, exc=exc)
            target = spool.dead_letter(sop, reason, extra={"stage": "report", "attempts": self.request.retries + 1})
            audit.record("dead_lettered", reason=reason, path=str(target), **base)
            return {"status": "dead_lettered"}
    files = pipeline.result_files(box)
    done = set(json.loads(state_file.read_text())) if state_file.exists() else set()
    try:
        sent = pipeline.deliver(files, cfg.destinations, done, context=pipeline.result_context(box))
    except FileNotFoundError:
        # A duplicate delivery of this task (after a reconcile) finished first and cleaned the outbox up.
        if not Path(payload["path"]).exists():
            audit.record("report_noop", reason="already delivered by a duplicate task", **base)
            return {"status": "noop"}
        raise
    except SendFailed as exc:
        atomic_write(state_file, json.dumps(sorted(done)).encode())
        if exc.retryable and self.request.retries + 1 < cfg.retry.max_attempts:
            delay = _backoff(self.request.retries)
            audit.record("retry", reason=str(exc), delay_s=delay, **base)
            raise self.retry(countdown=delay, exc=exc)
        archive(box, prediction, payload)
        target = spool.dead_letter(sop, str(exc), files=files + [box / "prediction.json"], extra={"stage": "send", "sent_to": sorted(done),
                                                                    "attempts": self.request.retries + 1})
        audit.record("dead_lettered", reason=str(exc), path=str(target), **base)
        return {"status": "dead_lettered"}
    archive(box, prediction, payload)
    latency = round(time.time() - float(payload.get("received_at", time.time())), 3)
    audit.record("sent", destinations=sorted(done), sent_uids=sorted({u for v in sent.values() for u in v}),
                 positive=prediction.positive, probability=round(prediction.probability, 4),
                 boxes=len(prediction.detections), latency_s=latency, **base)
    spool.discard(sop)
    return {"status": "sent", "latency_s": latency}


def archive(box: Path, prediction: Prediction, payload: dict) -> None:
    """Keep a copy of results and the PNG preview for ops (outputs.archive_dir; empty disables)."""
    if not cfg.outputs.archive_dir:
        return
    import shutil

    target = Path(cfg.outputs.archive_dir) / payload["sop_instance_uid"]
    target.mkdir(parents=True, exist_ok=True)
    for f in box.iterdir():
        if f.name != "sent.json":
            shutil.copy2(f, target / f.name)
