"""The node's work, independent of how it is driven (Celery tasks, the no-broker CLI, tests).

``analyze(path)`` -> Prediction; ``build(path, prediction)`` -> result files; ``deliver(files)`` -> sent UIDs.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from functools import lru_cache
from pathlib import Path

import pydicom

from . import dicom_io
from .age import read_age
from .config import Config, Destination
from .errors import SendFailed
from .failures import describe, is_transient
from .inference.types import Prediction
from .spool import atomic_write

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO_ROOT / "models" / "demo"


@lru_cache(maxsize=4)
def _load_model(path: str, device: str):
    from .inference.model import load_model, untrained_model

    if path == "untrained":
        log.warning("running an UNTRAINED model: results are meaningless and labelled so")
        return untrained_model(device="cpu" if device == "auto" else device)
    return load_model(path or DEMO_MODEL, device=device)


def get_model(cfg: Config):
    """The configured model, loaded once per process (lazily: CUDA must not be initialised before a fork)."""
    _set_threads(cfg.model.threads)
    with _model_lock:  # a warm-up thread and the first task must not load it twice
        return _load_model(cfg.model.path, cfg.model.device)


_model_lock = threading.Lock()


@lru_cache(maxsize=1)
def _set_threads(n: int) -> None:
    """torch's intra-op thread count for this process (``model.threads``; 0 leaves torch's default)."""
    if n > 0:
        import torch

        torch.set_num_threads(n)


def read_eligible(path: str | Path, cfg: Config):
    """Read a spooled instance and check it is a CXR we process (raises NotEligible / BadDataset)."""
    ds = dicom_io.read(path)
    dicom_io.check_eligible(ds, cfg.eligibility)
    return ds


def analyze(path: str | Path, cfg: Config, model=None, predict=None, display_to: Path | None = None,
            stats_out: dict | None = None) -> Prediction:
    """Decode, run the model, return the small JSON-able prediction.

    ``predict`` ((image, age in years or None) -> Prediction) lets a worker route the model call through a
    micro-batcher. ``display_to``: also keep the 8-bit rendering there for :func:`build` (the source is then decoded
    once per node), when this film gets an SC overlay (:func:`output_names`); else nothing is rendered. The
    patient's age (Patient's Age, else birth date and study date: :func:`triage_node.age.read_age`) picks the model's
    operating point when it has one per age; the prediction carries the rule that gave it (``age_rule``).
    ``stats_out``: filled with the film's input statistics (``inference.filmstats``, from the pixels decoded here)
    when ``monitoring.input_statistics`` is on. A site operating point (``triage-node calibrate --site``) replaces
    the package's threshold for the films of the point it was calibrated for.
    """
    t0 = time.perf_counter()
    ds = read_eligible(path, cfg)
    age = read_age(ds)
    img = dicom_io.pixels(ds, max_pixels=cfg.eligibility.max_pixels)
    t1 = time.perf_counter()
    if predict is None:
        model = model or get_model(cfg)
        predict = lambda im, a: model.predict([im], ages=[a])[0]
    pred = predict(img, age.years)
    t2 = time.perf_counter()
    timings = dict(pred.timings_ms)
    timings["decode"] = round((t1 - t0) * 1000, 1)
    timings["model"] = round((t2 - t1) * 1000, 1)
    if stats_out is not None and cfg.monitoring.input_statistics:
        from .inference import filmstats

        stats_out.update(filmstats.image_statistics(img), **filmstats.header_statistics(ds, age.years))
        timings["stats"] = round((time.perf_counter() - t2) * 1000, 2)
    pred = site_point(cfg, pred)
    if display_to is not None and "sc" in output_names(cfg, pred):  # only the overlay needs the pixels
        try:
            save_display(display_to, dicom_io.display(img))  # full size: the report worker reduces it
        except OSError as exc:  # only a cache: the report worker decodes the source instead
            log.warning("display cache not written for %s: %s", ds.get("SOPInstanceUID", "?"), exc.strerror or exc)
        timings["display"] = round((time.perf_counter() - t2) * 1000 - timings.get("stats", 0.0), 1)
    return Prediction(pred.probability, pred.threshold, pred.detections, pred.model, pred.rows, pred.columns, timings,
                      pred.operating_point, age.text)


def site_point(cfg: Config, pred: Prediction) -> Prediction:
    """``pred`` judged at the site operating point when one is configured for its package and point."""
    if not cfg.model.site_operating_point:
        return pred
    from .monitoring.site import apply_site_point

    return apply_site_point(cfg, pred)


_KIND_BY_SOP_CLASS = {
    "1.2.840.10008.5.1.4.1.1.88.33": "sr",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34": "sr",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.7": "sc",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.11.1": "gsps",  # Grayscale Softcopy Presentation State
}


def output_names(cfg: Config, prediction: Prediction | None = None) -> tuple[str, ...]:
    """The configured outputs, SR first; given a ``prediction``, those built for that film: with
    ``outputs.sc_for = "flagged"`` a film below its operating threshold gets no SC overlay."""
    sc = cfg.outputs.sc and (prediction is None or cfg.outputs.sc_for == "all" or prediction.positive)
    return tuple(k for k, on in (("sr", True), ("sc", sc), ("gsps", cfg.outputs.gsps)) if on)


def build(path: str | Path, prediction: Prediction, cfg: Config, out_dir: Path,
          preview: bool | None = None, only: tuple[str, ...] | None = None) -> list[Path]:
    """Write SR (+ SC overlay, + GSPS) for the instance at ``path`` into ``out_dir``; returns the files.

    Output UIDs derive from the source SOP Instance UID and the model version, so a rebuild replaces. The 8-bit
    rendering the infer worker left in ``out_dir/display.npy`` (:func:`analyze` ``display_to``) is used when it is
    there (then only the source's header is read), else the source is decoded here. ``preview``: write
    ``preview.png`` (default: when ``outputs.archive_dir`` keeps results, where the dashboard reads it).

    ``only``: build just these of the configured outputs (the report worker's SR-first phases: ``("sr",)``, then
    the rest). ``prediction.json`` is written with the SR; the display cache is kept until the overlay is built.
    """
    from .encoding import dcmwrite
    from .encoding.results import build_results
    from .encoding.sc import SC_ENCODINGS, render_overlay

    built = output_names(cfg, prediction)  # this film's outputs (outputs.sc_for)
    outputs = built if only is None else tuple(o for o in built if o in only)
    cache = out_dir / DISPLAY_CACHE
    display = load_display(cache) if "sc" in outputs else None  # only the overlay needs pixels
    ds = dicom_io.read(path, header_only=display is not None or "sc" not in outputs)
    # the overlay's size: the source's, or reduced to outputs.sc_max_size, here in the report worker (on a GPU node
    # the infer worker is the one to keep lean); a cache of another size is not used
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    size = dicom_io.fit_size(rows, columns, cfg.outputs.sc_max_size)
    if display is not None and display.shape == (rows, columns) != size:
        display = dicom_io.reduce_display(display, cfg.outputs.sc_max_size)
    if "sc" in outputs and (display is None or display.shape != size):
        if display is not None:
            ds = dicom_io.read(path)
        display = dicom_io.display(dicom_io.pixels(ds, max_pixels=cfg.eligibility.max_pixels), cfg.outputs.sc_max_size)
        del ds.PixelData  # and the decoded array pydicom keeps with it: the encoders copy the header only
    earlier = previous_sr(cfg, str(ds.SOPInstanceUID)) if "sr" in outputs else None
    overlay = None  # the SC's pixels, rendered once: the SC and the preview are made from them
    if "sc" in outputs and display is not None and display.shape == size:
        palette = SC_ENCODINGS[cfg.outputs.sc_transfer_syntax][1] == "PALETTE COLOR"
        overlay = render_overlay(display, prediction, palette=palette)
    datasets, _changed = build_results(ds, display, prediction, outputs=outputs, predecessor_sr=earlier,
                                       sc_encoding=cfg.outputs.sc_transfer_syntax, overlay=overlay)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for out in datasets:
        kind = _KIND_BY_SOP_CLASS.get(str(out.SOPClassUID), "obj")
        f = out_dir / f"{kind}-{out.SOPInstanceUID}.dcm"
        dcmwrite.save(out, f)  # the bytes of out.save_as(f, enforce_file_format=True), a fifth of the CPU
        files.append(f)
    if overlay is not None and (bool(cfg.outputs.archive_dir) if preview is None else preview):
        write_preview(overlay, out_dir / "preview.png")
    if "sr" in outputs:
        atomic_write(out_dir / "prediction.json", json.dumps(prediction.to_json(), indent=1).encode(), mode=0o640)
    if "sc" in outputs or "sc" not in built:  # else a later phase builds the overlay from it
        cache.unlink(missing_ok=True)
    return files


DISPLAY_CACHE = "display.npy"


def save_display(path: Path, display) -> None:
    """Keep the 8-bit rendering for the report worker (a cache: tmp + rename, no fsync; lost = decoded again)."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        with open(tmp, "wb") as f:
            np.save(f, display, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no partial file behind
        raise


def load_display(path: Path):
    """The cached rendering, or None when there is none or it is unreadable."""
    import numpy as np

    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    return arr if arr.ndim == 2 and arr.dtype == np.uint8 else None


def previous_sr(cfg: Config, source_sop_instance_uid: str):
    """The newest SR this node archived for the same source (an earlier model version), or None.

    A re-run with a new model version gets new UIDs (they derive from the version) and references this one in its
    Predecessor Documents Sequence: earlier results are superseded, never overwritten.
    """
    if not cfg.outputs.archive_dir:
        return None
    folder = Path(cfg.outputs.archive_dir) / source_sop_instance_uid
    candidates = sorted(folder.glob("sr-*.dcm"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    return pydicom.dcmread(candidates[-1]) if candidates else None


PREVIEW_PX = 256  # the dashboard shows 96 px thumbnails; the full-resolution overlay is the SC


def write_preview(overlay, png: Path) -> None:
    """A downscaled PNG of the overlay (at most PREVIEW_PX a side) for the dashboard and the ``analyze`` CLI.

    Made from the overlay's pixels in memory (decoding the SC just encoded cost ~40 ms), downscaled by an integer
    box filter (``reduce``: ~1 ms against ~11 ms for ``thumbnail``'s resampling; a palette overlay is subsampled and
    written as a palette PNG with the SC's palette: the same colours as RGB, 1.4 ms against 3.6 and ~20 % smaller).
    ``overlay``: an RGB array, a 2-D array of palette indices, or an SC dataset (decoded then).
    """
    import numpy as np
    from PIL import Image

    from .encoding.sc import PALETTE_RGB

    if hasattr(overlay, "pixel_array"):
        overlay = overlay.pixel_array  # palette indices for a PALETTE COLOR SC
    factor = -(-max(overlay.shape[:2]) // PREVIEW_PX)  # ceil
    if overlay.ndim == 2:  # palette indices: subsample (averaging indices would mean nothing)
        indices = np.ascontiguousarray(overlay[::factor, ::factor] if factor > 1 else overlay, dtype=np.uint8)
        im = Image.frombytes("P", (indices.shape[1], indices.shape[0]), indices.tobytes())
        im.putpalette(PALETTE_RGB.tobytes())
    else:
        im = Image.fromarray(overlay)
        if factor > 1:
            im = im.reduce(factor)
    im.save(png, compress_level=1)


def result_context(folder: Path):
    """Identifiers + prediction for the flag channels, from a result folder (outbox or dead letter, named by the
    source SOP Instance UID, holding the SR and prediction.json)."""
    from .transport.flags import ResultContext

    pred_file = folder / "prediction.json"
    srs = sorted(folder.glob("sr-*.dcm"))
    if not pred_file.exists() or not srs:
        return None
    sr = pydicom.dcmread(srs[0], stop_before_pixels=True)
    return ResultContext(
        prediction=Prediction.from_json(json.loads(pred_file.read_text())),
        study_instance_uid=str(sr.StudyInstanceUID), source_sop_instance_uid=folder.name,
        accession=str(sr.get("AccessionNumber", "") or ""), patient_id=str(sr.get("PatientID", "") or ""),
        sr_series_instance_uid=str(sr.SeriesInstanceUID), sr_sop_instance_uid=str(sr.SOPInstanceUID))


def deliver(files: list[Path], destinations: tuple[Destination, ...], done: set[str] | None = None,
            context=None) -> dict[str, list[str]]:
    """Send to every destination not yet in ``done`` (which is updated as each succeeds).

    A failure at one destination does not stop delivery to the others; the first failure is raised afterwards
    (retryable if any failure was retryable) so the caller retries only what is missing.
    """
    from .transport.senders import make_sender

    done = set() if done is None else done
    sent: dict[str, list[str]] = {}
    failures: list[SendFailed] = []
    for dest in destinations:
        if dest.name in done:
            continue
        try:
            sent[dest.name] = make_sender(dest).send(files, context)
            done.add(dest.name)
        except SendFailed as exc:
            failures.append(exc)
        except (OSError, ValueError) as exc:  # DNS, refused sockets, malformed config
            failures.append(SendFailed(f"{dest.name}: {type(exc).__name__}: {exc}"))
        except Exception as exc:  # a sender's or flag channel's unforeseen error: others go on
            failures.append(SendFailed(f"{dest.name}: {describe(exc)}", retryable=is_transient(exc)))
    if failures:
        msg = "; ".join(str(f) for f in failures)
        raise SendFailed(msg, retryable=any(f.retryable for f in failures))
    return sent


def result_files(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("*.dcm"))
