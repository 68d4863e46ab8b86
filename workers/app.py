"""Celery worker entry point.

    celery -A workers.app worker -Q infer  --pool=prefork --concurrency=1   # one process per GPU (or CPU)
    celery -A workers.app worker -Q report --pool=threads --concurrency=4   # I/O: build results, send, retry

Configuration comes from ``TRIAGE_CONFIG`` / ``TRIAGE_*`` (see triage_node.config). Tasks are thin adapters:
serialisation, retry/no-retry decisions and audit; the work is in ``triage_node.pipeline``.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from celery.exceptions import Retry

from triage_node import config, pipeline
from triage_node.audit import Audit
from triage_node.errors import BadDataset, InstanceUnavailable, ModelError, NotEligible, SendFailed
from triage_node.failures import attempts_allowed, describe
from triage_node.inference.types import Prediction
from triage_node.monitoring import mode as outputs_mode
from triage_node.queue import ANALYZE_TASK, REPORT_TASK, make_app
from triage_node.spool import Spool, atomic_write, valid_uid
from triage_node.transport import instances, senders
from workers import warmup  # noqa: F401  (signal handlers: model loaded before the first task)

log = logging.getLogger("workers")
logging.getLogger("highdicom").setLevel(logging.WARNING)
cfg = config.load()
app = make_app(cfg, name="workers")
spool = Spool.from_config(cfg)
audit = Audit.from_config(cfg)
senders.set_audit(audit)  # a stalled C-STORE's resend goes to the node's own trail
#: Fetched copies older than this were left by tasks redelivered to another host; swept at most once an hour.
FETCHED_MAX_AGE_S = 86400.0
_next_sweep = 0.0


_batcher = None
_batcher_lock = threading.Lock()


def _predict() -> AbstractContextManager[Callable[[Any, Any], Any] | None]:
    """For one analyze task: a context giving the (image, age) -> Prediction callable, through the worker's shared
    micro-batcher when it runs several task threads (``model.batch_size`` > 1; None otherwise: one at a time).

    The task enters it before decoding, so the batcher knows an image is coming and waits for it (up to
    ``model.batch_wait_ms``) only then: under a backlog the task threads fill batches, a lone CXR runs at once."""
    global _batcher
    if cfg.model.batch_size <= 1:
        return nullcontext(None)
    with _batcher_lock:
        if _batcher is None:
            from triage_node.batching import MicroBatcher

            def run(items):  # (image, age in years or None) per task
                preds = pipeline.get_model(cfg).predict([im for im, _ in items], ages=[a for _, a in items])
                for p in preds:
                    p.timings_ms["batch"] = len(items)
                return preds

            _batcher = MicroBatcher(run, cfg.model.batch_size, cfg.model.batch_wait_ms / 1000,
                                    wait_for_announced=True)
    return _ticket_call(_batcher)


@contextmanager
def _ticket_call(batcher: Any) -> Iterator[Callable[[Any, Any], Any]]:
    with batcher.ticket() as ticket:
        yield lambda image, age: ticket((image, age))


def _backoff(attempt: int) -> float:
    return min(cfg.retry.backoff_base_s * (2 ** attempt), cfg.retry.backoff_max_s)


def _source(payload: dict, sop: str, base: dict) -> tuple[Path | None, bool]:
    """(the instance on this host, whether it was fetched). The task's spool path when this host sees it (one
    shared filesystem); else a copy fetched from the receiver's instance server into ``<spool>/fetched/``
    (``source_url`` in the task). (None, _) when the instance is finished: its spool file is gone, or the receiver
    says it no longer holds it. Raises InstanceUnavailable when the receiver cannot be reached."""
    global _next_sweep
    path = Path(payload["path"])
    url = payload.get("source_url")
    if path.exists() or not url:
        return (path if path.exists() else None), False
    local = spool.fetched_path(sop)
    if local.exists():  # fetched by an earlier try of this task on this host
        return local, True
    if time.time() >= _next_sweep:
        _next_sweep = time.time() + 3600
        spool.sweep_fetched(FETCHED_MAX_AGE_S)
    t0 = time.time()
    size = instances.fetch(url, sop, local, cfg.instances)
    if size is None:
        return None, True
    audit.record("fetched", bytes=size, ms=round((time.time() - t0) * 1000, 1), **base)
    return local, True


def _release(payload: dict, sop: str, fetched: bool, dead_letter: dict | None = None) -> None:
    """A fetched instance is finished here: the receiver drops its spool copy (or dead-letters it with the reason,
    so ops find it on the receiver host too). Not reached: its periodic reconcile re-enqueues it (at least once)."""
    if not fetched:
        return
    if not instances.release(payload["source_url"], sop, cfg.instances, worker=socket.gethostname(),
                             dead_letter=dead_letter):
        audit.record("release_failed", sop_instance_uid=sop, dead_lettered=dead_letter is not None)


def _dead_letter(sop: str, why: str, payload: dict, fetched: bool, base: dict, files: list[Path] | None = None,
                 extra: dict | None = None) -> Path:
    """Dead-letter on this host (result files, source, reason.json) and, for a fetched instance, at the receiver."""
    target = spool.dead_letter(sop, why, files=files, extra=extra)
    audit.record("dead_lettered", reason=why, path=str(target), **{"stage": (extra or {}).get("stage"), **base})
    _release(payload, sop, fetched, dead_letter={"reason": why, "stage": (extra or {}).get("stage", ""),
                                                 "path": str(target.resolve())})
    return target


def _failed(task, sop: str, stage: str, exc: BaseException, base: dict, files: list[Path] | None = None,
            payload: dict | None = None, fetched: bool = False, task_stage: str = "") -> dict:
    """Any exception of any stage: audited and logged with its stage and reason, retried with backoff while the
    attempts counted durably for the instance allow it (none for a data or code error), then dead-lettered.
    ``task_stage``: the task's stage for the crash counter (default: ``analyze`` or ``report`` from ``stage``)."""
    reason = describe(exc)
    n = max(spool.fail(sop, stage, reason), task.request.retries + 1)  # the durable count, or Celery's if lost
    allowed = attempts_allowed(exc, cfg.retry.max_attempts)
    again = n < allowed
    log.warning("%s failed for %s (attempt %d of %d): %s", stage, sop, n, allowed, reason)
    audit.record("failed", stage=stage, reason=reason, failures=n, will_retry=again, **base)
    if again:
        delay = _backoff(n - 1)
        audit.record("retry", stage=stage, reason=reason, delay_s=delay, **base)
        spool.end(sop, task_stage or ("analyze" if stage == "analyze" else "report"))
        raise task.retry(countdown=delay, exc=exc)
    why = f"bad dataset: {exc}" if isinstance(exc, BadDataset) else f"{stage}: {reason}"
    _dead_letter(sop, why, payload or {}, fetched, base, files=files, extra={"stage": stage, "attempts": n})
    return {"status": "dead_lettered", "stage": stage, "reason": why}


def _malformed(payload: object, stage: str, task_id: str) -> dict | None:
    """A task message this node cannot read (another version, a hand-made one): audited, nothing to retry."""
    if isinstance(payload, dict) and valid_uid(payload.get("sop_instance_uid", "")) and payload.get("path"):
        return None
    audit.record("failed", stage=stage, reason="malformed task payload", task_id=task_id)
    log.error("%s task %s: malformed payload, dropped", stage, task_id)
    return {"status": "failed", "reason": "malformed task payload"}


def _poisoned(sop: str, stage: str, base: dict, payload: dict, fetched: bool) -> dict | None:
    """The poison-instance rule at the start of a task: dead-letter what crashed its workers too often."""
    if spool.begin(sop, stage) <= cfg.retry.max_attempts:
        return None
    why = spool.poison(sop, cfg.retry.max_attempts) or f"poison instance: {stage} started too often"
    log.error("dead-lettering %s: %s", sop, why)
    _dead_letter(sop, why, payload, fetched, base, extra={"stage": stage})
    return {"status": "dead_lettered", "reason": why}


@app.task(name=ANALYZE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def analyze(self, payload: dict) -> dict:
    """Infer queue: decode + model. Hands a small JSON prediction to the report queue."""
    malformed = _malformed(payload, "analyze", self.request.id)
    if malformed:
        return malformed
    sop = payload["sop_instance_uid"]
    base = {"sop_instance_uid": sop, "task_id": self.request.id}
    try:
        path, fetched = _source(payload, sop, base)
    except InstanceUnavailable as exc:
        return _failed(self, sop, "fetch", exc, base, payload=payload, fetched=True, task_stage="analyze")
    if path is None:
        # Finished by an earlier delivery of the same instance (redelivery after a crash, or a duplicate).
        audit.record("analyze_noop", reason="spool file already processed", **base)
        return {"status": "noop"}
    poisoned = _poisoned(sop, "analyze", base, payload, fetched)
    if poisoned:
        return poisoned
    t0 = time.time()
    audit.record("analyze_started", redelivered=bool(self.request.delivery_info.get("redelivered")), **base)
    stats: dict = {}  # the film's input statistics (monitoring.input_statistics), for the drift monitor
    try:
        with _predict() as predict:
            # decoded once per node: the display is kept for the overlay (analyze skips it for a film without one)
            pred = pipeline.analyze(path, cfg, predict=predict,
                                    display_to=spool.outbox_dir(sop) / pipeline.DISPLAY_CACHE, stats_out=stats)
    except NotEligible as exc:
        audit.record("skipped", reason=str(exc), **base)
        spool.discard(sop)
        _release(payload, sop, fetched)
        return {"status": "skipped", "reason": str(exc)}
    except ModelError as exc:
        # A broken model package is an operator problem (/readyz shows it), not the instance's: keep the instance
        # for another worker or the next sweep, and do not count it against the instance.
        audit.record("failed", reason=f"model: {exc}", stage="analyze", **base)
        spool.end(sop, "analyze")
        raise
    except Exception as exc:  # BadDataset and anything unforeseen: no silent failure
        return _failed(self, sop, "analyze", exc, base, payload=payload, fetched=fetched)
    audit.record("analysed", probability=round(pred.probability, 4), positive=pred.positive,
                 boxes=len(pred.detections), model=pred.model.label, ms=round((time.time() - t0) * 1000, 1),
                 batch=int(pred.timings_ms.get("batch", 1)), threshold=round(pred.threshold, 6),
                 operating_point=pred.operating_point, hostname=self.request.hostname,
                 **({"stats": stats} if stats else {}), **base)
    if fetched:
        # The report task fetches its own copy (it may run on another host): nothing of this one stays here.
        # Before the hand-over, or a report task on this host could find its fresh copy deleted under it.
        spool.discard(sop)
    try:
        app.send_task(REPORT_TASK, args=[{**payload, "prediction": pred.to_json(), "analysed_at": time.time(),
                                          **({"input_statistics": stats} if stats else {})}])
    except Exception as exc:  # broker gone between the two queues, or anything else
        return _failed(self, sop, "analyze", exc, base, payload=payload, fetched=fetched)
    spool.end(sop, "analyze")
    return {"status": "analysed", "positive": pred.positive}


@app.task(name=REPORT_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def report(self, payload: dict) -> dict:
    """Report queue: build SR/SC/GSPS once into the outbox, deliver, retry with backoff, then dead-letter."""
    malformed = _malformed(payload, "report", self.request.id)
    if malformed:
        return malformed
    sop = payload["sop_instance_uid"]
    base = {"sop_instance_uid": sop, "task_id": self.request.id, "attempt": self.request.retries + 1}
    try:
        src, fetched = _source(payload, sop, base)
    except InstanceUnavailable as exc:
        return _failed(self, sop, "fetch", exc, base, payload=payload, fetched=True, task_stage="report")
    if src is None:
        audit.record("report_noop", reason="already delivered", **base)
        return {"status": "noop"}
    poisoned = _poisoned(sop, "report", base, payload, fetched)
    if poisoned:
        return poisoned
    box = spool.outbox_dir(sop)
    stage = "build"
    try:
        if outputs_mode.current(cfg)[0] == "shadow":  # a broker that cannot say raises: retried, never sent
            return _shadow(sop, src, payload, base, fetched)
        prediction = Prediction.from_json(payload["prediction"])
        phases = _phases(prediction)
        for i, (phase, outputs, destinations) in enumerate(phases):
            stage = "build"
            _build_phase(src, prediction, box, phase, outputs, first=i == 0)
            stage = "send"
            later = phases[i + 1:]

            def complete(later: list = later) -> None:  # a dead letter holds every result, so replay sends all
                for p, outs, _ in later:
                    _build_phase(src, prediction, box, p, outs, first=False)

            result = _deliver(self, sop, box, prediction, payload, base, fetched, phase, destinations,
                              last=not later, complete=complete)
            if result.get("status") == "dead_lettered":
                break
    except Retry:
        raise
    except Exception as exc:  # anything, foreseen or not, in build, delivery or archiving
        if isinstance(exc, FileNotFoundError) and not fetched and not src.exists():
            # A duplicate delivery of this task (after a reconcile) finished first and cleaned the outbox up.
            # (A fetched copy that vanished proves nothing: the retry asks the receiver, which knows.)
            audit.record("report_noop", reason="already delivered by a duplicate task", **base)
            return {"status": "noop"}
        return _failed(self, sop, stage, exc, base, files=_files(box), payload=payload, fetched=fetched)
    spool.end(sop, "report")
    return result


def _shadow(sop: str, src: Path, payload: dict, base: dict, fetched: bool) -> dict:
    """Shadow mode: build every result into the archive (``outputs.archive_dir``) and audit the score and the
    film's statistics; nothing goes to a destination or flag channel."""
    prediction = Prediction.from_json(payload["prediction"])
    box = spool.outbox_dir(sop)
    pipeline.build(src, prediction, cfg, box, preview=True)
    archive(box, prediction, payload)
    latency = round(time.time() - float(payload.get("received_at", time.time())), 3)
    audit.record("shadow", probability=round(prediction.probability, 4), positive=prediction.positive,
                 threshold=round(prediction.threshold, 6), operating_point=prediction.operating_point,
                 boxes=len(prediction.detections), latency_s=latency,
                 archived=str(Path(cfg.outputs.archive_dir) / sop) if cfg.outputs.archive_dir else "",
                 **({"stats": payload["input_statistics"]} if payload.get("input_statistics") else {}), **base)
    spool.discard(sop)
    _release(payload, sop, fetched)
    spool.end(sop, "report")
    return {"status": "shadow"}


#: Destination kinds that receive files; the flag channels (hl7, fhir, webhook) report the finding once, with the SR.
_FILE_KINDS = frozenset({"dicom", "stow", "folder"})


def _phases(prediction: Prediction) -> list[tuple[str, tuple[str, ...] | None, tuple]]:
    """(phase, outputs built in it or None for all, destinations) in order. SR-first: the SR goes to every
    destination (flags included) before the overlay and GSPS are built and sent to the file destinations. Only
    this film's outputs count (``outputs.sc_for``): a negative film without an overlay or GSPS has one phase."""
    rest = tuple(o for o in pipeline.output_names(cfg, prediction) if o != "sr")
    if not cfg.outputs.sr_first or not rest:
        return [("all", None, cfg.destinations)]
    return [("sr", ("sr",), cfg.destinations),
            ("images", rest, tuple(d for d in cfg.destinations if d.kind in _FILE_KINDS))]


def _build_phase(src: Path, prediction: Prediction, box: Path, phase: str, outputs: tuple[str, ...] | None,
                 first: bool) -> None:
    """Build what ``phase`` sends unless an earlier attempt built it (its marker file is there)."""
    marker = box / ("prediction.json" if first else f"built-{phase}")
    if marker.exists():
        return
    before = set(box.iterdir()) if box.is_dir() else set()
    try:
        pipeline.build(src, prediction, cfg, box, only=outputs)
    except BaseException:
        if first:
            shutil.rmtree(box, ignore_errors=True)  # a half-written outbox must not pass for a built one
        else:  # keep what the earlier phase built (and maybe sent); drop this phase's partial files
            for f in set(box.iterdir()) - before:
                f.unlink(missing_ok=True)
        raise
    if not first:
        marker.touch()


def _files(box: Path) -> list[Path]:
    return pipeline.result_files(box) + [box / "prediction.json"] if box.is_dir() else []


def _phase_files(box: Path, phase: str) -> list[Path]:
    files = pipeline.result_files(box)
    if phase == "sr":
        return [f for f in files if f.name.startswith("sr-")]
    if phase == "images":
        return [f for f in files if not f.name.startswith("sr-")]
    return files


def _deliver(task, sop: str, box: Path, prediction: Prediction, payload: dict, base: dict, fetched: bool,
             phase: str = "all", destinations: tuple | None = None, last: bool = True,
             complete: Callable[[], None] | None = None) -> dict:
    """Send what ``phase`` has not yet sent; a send failure is retried ``retry.max_attempts`` times (the whole task,
    earlier phases skipped as done), then dead-lettered. Per-phase progress is kept in ``sent.json``."""
    state_file = box / "sent.json"
    destinations = cfg.destinations if destinations is None else destinations
    files = _phase_files(box, phase)
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    if isinstance(state, list):  # written by a node before SR-first: one phase
        state = {"all": state}
    done = set(state.get(phase, []))
    if not last and done >= {d.name for d in destinations}:
        return {"status": "sent"}  # an earlier attempt finished this phase
    try:
        sent = pipeline.deliver(files, destinations, done,
                                context=pipeline.result_context(box) if phase != "images" else None)
    except SendFailed as exc:
        atomic_write(state_file, json.dumps({**state, phase: sorted(done)}).encode())
        if exc.retryable and task.request.retries + 1 < cfg.retry.max_attempts:
            delay = _backoff(task.request.retries)
            audit.record("retry", reason=str(exc), delay_s=delay, stage="send", phase=phase, **base)
            spool.end(sop, "report")
            raise task.retry(countdown=delay, exc=exc) from exc
        if complete is not None and not last:
            try:
                complete()
            except Exception as build_exc:  # the dead letter still goes, with what was built
                log.warning("%s: building the rest for the dead letter failed: %s", sop, describe(build_exc))
        files = pipeline.result_files(box)
        archive(box, prediction, payload)
        _dead_letter(sop, str(exc), payload, fetched, base, files=files + [box / "prediction.json"],
                     extra={"stage": "send", "phase": phase, "sent_to": sorted(done),
                            "attempts": task.request.retries + 1})
        return {"status": "dead_lettered"}
    latency = round(time.time() - float(payload.get("received_at", time.time())), 3)
    uids = sorted(set(state.get("uids", [])) | {u for v in sent.values() for u in v})
    if not last:
        # not fsynced: lost in a crash, the SR is only sent again under the same UIDs (the PACS keeps one copy)
        atomic_write(state_file, json.dumps({**state, phase: sorted(done), "uids": uids}).encode(), durable=False)
        audit.record("sr_sent", destinations=sorted(done), sent_uids=uids, latency_s=latency,
                     positive=prediction.positive, probability=round(prediction.probability, 4), **base)
        return {"status": "sent", "latency_s": latency}
    archive(box, prediction, payload)
    audit.record("sent", destinations=sorted(d.name for d in cfg.destinations), sent_uids=uids,
                 positive=prediction.positive, probability=round(prediction.probability, 4),
                 boxes=len(prediction.detections), latency_s=latency, **base)
    spool.discard(sop)
    _release(payload, sop, fetched)
    return {"status": "sent", "latency_s": latency}


def archive(box: Path, prediction: Prediction, payload: dict) -> None:
    """Keep a copy of results and the PNG preview for ops (outputs.archive_dir; empty disables)."""
    if not cfg.outputs.archive_dir:
        return
    target = Path(cfg.outputs.archive_dir) / payload["sop_instance_uid"]
    target.mkdir(parents=True, exist_ok=True)
    for f in box.iterdir():
        if f.name != "sent.json" and f.name != pipeline.DISPLAY_CACHE and not f.name.startswith("built-"):
            shutil.copy2(f, target / f.name)
