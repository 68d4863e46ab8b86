"""The site operating point: a threshold chosen on this site's validated films (``triage-node calibrate --site``).

Kept outside the model package (``[model] site_operating_point``, default ``var/site/operating_point.json``), which
is never edited. The file names the package by the SHA-256 of its ``model.json`` (which itself holds the weights'
checksums): for any other package it is ignored with a warning, so a model update never inherits a threshold
chosen for another model. Format::

    {"format": 1, "threshold": 0.31, "applies_to": "adult", "package": "cxr-triage-demo 0.4.0-demo",
     "package_sha256": "...", "calibrated_at": "2026-12-07T17:05:00Z", "by": "jdoe", "rule": "...",
     "calibration": {"n": 212, "positives": 40, "sensitivity": 0.9, "specificity": 0.61, ...}}

``applies_to``: ``adult`` (films judged at the package's adult point, including those without a readable age),
``pediatric``, or ``all``. A film judged at it has ``operating_point = "site <calibrated_at>"``, which the SR's
Algorithm Parameters carry (``operating_point=site 2026-12-07T17:05:00Z``, ``threshold=0.31``), as do the audit
and the flags. Boxes come from the package's localiser: a film the package's own point called negative has none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import Config
from ..inference.types import Prediction

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO_ROOT / "models" / "demo"
_POINTS = {"adult": ("", "adult", "age unknown"), "pediatric": ("pediatric",)}
_cache: dict[str, tuple[tuple, dict | None]] = {}
_lock = threading.Lock()


def model_dir(cfg: Config) -> Path | None:
    """The configured model package directory (None for the untrained test model)."""
    if cfg.model.path == "untrained":
        return None
    return Path(cfg.model.path) if cfg.model.path else DEMO_MODEL


def package_sha256(directory: Path | None) -> str:
    """SHA-256 of the package's model.json ("" when there is none)."""
    try:
        return hashlib.sha256((Path(directory) / "model.json").read_bytes()).hexdigest() if directory else ""
    except OSError:
        return ""


def _key(path: Path, pkg: Path | None) -> tuple:
    def mt(p: Path) -> float:
        try:
            return os.stat(p).st_mtime_ns
        except OSError:
            return -1

    return (mt(path), mt(pkg / "model.json") if pkg else -1)


def load_site_point(cfg: Config) -> dict | None:
    """The site point for the configured package, or None (no file, unreadable, or made for another package).
    Re-read when the file or the package changes (one ``stat`` per film otherwise): no restart needed."""
    if not cfg.model.site_operating_point:
        return None
    path, pkg = Path(cfg.model.site_operating_point), model_dir(cfg)
    key = _key(path, pkg)
    with _lock:
        hit = _cache.get(str(path))
        if hit and hit[0] == key:
            return hit[1]
    point = _read(path, pkg)
    with _lock:
        _cache[str(path)] = (key, point)
    return point


def _read(path: Path, pkg: Path | None) -> dict | None:
    if not path.is_file():
        return None
    try:
        point = json.loads(path.read_text())
        float(point["threshold"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("site operating point %s unreadable (%s): the package's points apply", path, exc)
        return None
    if point.get("package_sha256") != package_sha256(pkg):
        log.warning("site operating point %s was calibrated for another package (%s): ignored", path,
                    point.get("package", "?"))
        return None
    return point


def point_name(point: dict) -> str:
    return f"site {point.get('calibrated_at', '')}".strip()


def apply_site_point(cfg: Config, pred: Prediction) -> Prediction:
    """``pred`` with the site threshold when the site point applies to the point that judged it."""
    point = load_site_point(cfg)
    if point is None:
        return pred
    applies = point.get("applies_to", "adult")
    if applies != "all" and pred.operating_point not in _POINTS.get(applies, ()):
        return pred
    t = float(point["threshold"])
    dets = pred.detections if pred.probability >= t else ()
    return replace(pred, threshold=t, detections=dets, operating_point=point_name(point))


def write_site_point(cfg: Config, threshold: float, applies_to: str, rule: str, calibration: dict[str, Any],
                     by: str, when: str, package_label: str = "") -> Path:
    """Write the site point file (tmp + rename) for the configured package; returns its path."""
    path = Path(cfg.model.site_operating_point or "var/site/operating_point.json")
    pkg = model_dir(cfg)
    doc = {"format": 1, "threshold": float(threshold), "applies_to": applies_to, "package": package_label,
           "package_dir": str(pkg or ""), "package_sha256": package_sha256(pkg), "calibrated_at": when, "by": by,
           "rule": rule, "calibration": calibration}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    with _lock:
        _cache.pop(str(path), None)
    return path
