"""Warm a worker up before its first task, so the first CXR after a start waits for nothing but its own work.

Inference workers load the model and run it once on a blank image (imports, weights, the first-call kernels: ~10 s
on a busy 2-core CPU otherwise spent on the first instance); report workers build one full result set (SR, overlay,
GSPS, preview, as configured) for a small blank synthetic film in a temporary folder that is then deleted: nothing
is sent, archived or audited. The first build in a process costs ~0.7 s of CPU more than the next ones (highdicom
loads its tables of the standard, the encoders their libraries; measured 660-800 vs 65-83 ms on a sample), which
would otherwise land on the first CXR after every start.
Where it happens: in the prefork child after the fork (CUDA must not be initialised in the parent), in a thread, or
in the worker process itself for the threads/solo pools. A failure here is logged and left to the first task, which
reports it through the normal failure path (a broken model package is an operator problem that ``/readyz`` shows).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
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
        build_once(cfg)
    return time.perf_counter() - t0


def blank_film(path: Path) -> None:
    """A small blank 8-bit DX film with the attributes a result needs (made here: no training or synthesis code)."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1.1")  # DX, for presentation
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition, ds.PatientAge = "DX", "CHEST", "PA", "040Y"
    ds.PatientName, ds.PatientID = "WARM^UP", "WARMUP"
    for keyword in ("PatientBirthDate", "PatientSex", "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        setattr(ds, keyword, "")  # Type 2: present, empty (else the result builder reports them completed)
    ds.StudyDate, ds.StudyTime = "20260101", "000000"
    ds.Rows = ds.Columns = 128
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = (np.arange(128 * 128, dtype=np.uint32) % 251).astype(np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)


def build_once(cfg: Any) -> list[str]:
    """Build the configured results for :func:`blank_film` with one box, in a temporary folder; returns the names of
    what was built (the folder is deleted)."""
    import tempfile

    from triage_node import pipeline
    from triage_node.inference.types import Detection, ModelInfo, Prediction

    with tempfile.TemporaryDirectory(prefix="triage-warm-up-") as tmp:
        src = Path(tmp) / "blank.dcm"
        blank_film(src)
        pred = Prediction(probability=0.9, threshold=0.5, detections=(Detection(20, 30, 40, 50, 0.9),),
                          model=ModelInfo(name="warm-up", version="0-warm-up"), rows=128, columns=128)
        files = pipeline.build(src, pred, cfg, Path(tmp) / "out", preview=True)
        return sorted(f.name.split("-")[0] for f in files)


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
