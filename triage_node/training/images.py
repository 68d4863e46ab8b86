"""Image-level training data: ``path,label`` CSV sources, group (patient) splits, a decoded-image cache.

A source is a CSV with at least ``path,label`` (paths relative to the CSV; DICOM, PNG or JPEG). Optional columns:
a group column (``nih_patient_id``, ``id_prefix``, ``patient_id`` or ``group``; one patient's films always land in
one split), ``view`` (PA/AP, for per-view metrics), ``age`` (years, for age-specific operating points) and ``split``
(rows whose split is not ``train`` are ignored, as in Kermany's ``labels.csv``). Every image is decoded once,
exactly as the node decodes it (``dicom_io.pixels`` for DICOM, the same percentile window otherwise), squashed to
the working size with the node's own resize (``preprocess.to_batch``) and cached as uint8 under ``var/cache``.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)
GROUP_COLUMNS = ("nih_patient_id", "id_prefix", "patient_id", "patientId", "group")
LABEL_NAMES = {"0": 0, "1": 1, "normal": 0, "pneumonia": 1, "negative": 0, "positive": 1}


@dataclass
class Source:
    """One labelled image collection, decoded: ``images`` N x S x S uint8."""

    name: str
    csv: Path
    weight: float
    paths: list[Path]
    labels: np.ndarray
    groups: list[str]
    views: list[str]
    keys: list[str]
    images: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0, 0), np.uint8))
    ages: list[float | None] = field(default_factory=list)  # years, from an ``age`` column; empty without one

    def subset(self, idx: np.ndarray) -> Source:
        idx = np.asarray(idx, int)
        return Source(self.name, self.csv, self.weight, [self.paths[i] for i in idx], self.labels[idx],
                      [self.groups[i] for i in idx], [self.views[i] for i in idx], [self.keys[i] for i in idx],
                      self.images[idx], [self.ages[i] for i in idx] if self.ages else [])

    def __len__(self) -> int:
        return len(self.paths)


def parse_spec(spec: str) -> tuple[Path, float]:
    """``labels.csv`` or ``labels.csv:0.25`` (sampling weight)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(spec), 1.0


def read_source(spec: str, group_column: str | None = None) -> Source:
    """Read a ``path,label[,group][,view][,split]`` CSV (no decoding yet)."""
    path, weight = parse_spec(spec)
    base = path.parent
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if (r.get("split") or "train") == "train"]
    if not rows:
        raise ValueError(f"{path}: no rows")
    cols = rows[0].keys()
    gcol = group_column or next((c for c in GROUP_COLUMNS if c in cols), None)
    if gcol is not None and gcol not in cols:
        raise ValueError(f"{path}: no column {gcol!r}")
    paths, labels, groups, views, keys, ages = [], [], [], [], [], []
    for r in rows:
        rel = r.get("path") or r["file"]
        lab = str(r["label"]).strip().lower()
        paths.append(base / rel)
        labels.append(LABEL_NAMES[lab] if lab in LABEL_NAMES else int(float(lab)))
        groups.append(str(r[gcol]) if gcol else rel)  # no group column: every image its own group
        views.append(str(r.get("view") or "").upper())
        keys.append(r.get("image_id") or Path(rel).stem)
        ages.append(_years(r.get("age")))
    name = path.parent.name or path.stem
    return Source(name, path, weight, paths, np.array(labels, np.int64), groups, views, keys,
                  ages=ages if "age" in cols else [])


def _years(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def group_split(groups: list[str], fractions: tuple[float, float], seed: int = 0,
                force_last: set[str] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (train, val, test) with no group on two sides; ``force_last`` groups go to test.

    Seeded and independent of row order (groups are sorted before shuffling)."""
    uniq = sorted(set(groups))
    rng = np.random.default_rng(seed)
    rng.shuffle(uniq)
    forced = [g for g in uniq if force_last and g in force_last]
    rest = [g for g in uniq if not (force_last and g in force_last)]
    n_val, n_test = (int(round(len(uniq) * f)) for f in fractions)
    n_test = max(n_test - len(forced), 0)
    val, test = set(rest[:n_val]), set(rest[n_val:n_val + n_test]) | set(forced)
    side = np.array([2 if g in test else 1 if g in val else 0 for g in groups])
    return np.nonzero(side == 0)[0], np.nonzero(side == 1)[0], np.nonzero(side == 2)[0]


def cv_folds(groups: list[str], k: int, seed: int = 0) -> np.ndarray:
    """The cross-validation fold (0 .. k-1) of each row, by group: a patient's films share a fold. Seeded and
    independent of row order (groups sorted, shuffled, dealt round-robin), so the folds of one pool are the same in
    every run of a cross-validation."""
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, not {k}")
    uniq = sorted(set(groups))
    if len(uniq) < k:
        raise ValueError(f"{len(uniq)} group(s) cannot fill {k} folds")
    rng = np.random.default_rng([seed, 1_000_003])  # not the train/val/test split's own stream
    rng.shuffle(uniq)
    fold = {g: i % k for i, g in enumerate(uniq)}
    return np.array([fold[g] for g in groups], int)


def decode(path: Path, size: int) -> np.ndarray:
    """One image as the node sees it, squashed to ``size`` x ``size`` uint8."""
    from triage_node.inference.preprocess import to_batch
    from triage_node.training.data import load_image

    img = load_image(path)
    x = to_batch([img], size, torch.device("cpu"))[0, 0]
    return (x.numpy() * 255 + 0.5).astype(np.uint8)


def load_images(src: Source, size: int, cache_dir: Path | None = Path("var/cache"), progress: bool = True) -> Source:
    """Decode every image of ``src`` at ``size`` (cached by the CSV's content, its folder and ``size``)."""
    h = hashlib.sha256(src.csv.read_bytes() + str(src.csv.resolve()).encode() + str(size).encode()).hexdigest()[:16]
    cache = cache_dir / f"{src.name}-{size}-{h}.npy" if cache_dir else None
    if cache is not None and cache.exists():
        arr = np.load(cache)
        if arr.shape == (len(src), size, size):
            src.images = arr
            return src
    from tqdm import tqdm

    arr = np.stack([decode(p, size) for p in tqdm(src.paths, desc=f"decode {src.name}", disable=not progress)])
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache.with_suffix(".tmp.npy"), arr)
        cache.with_suffix(".tmp.npy").replace(cache)
    src.images = arr
    return src


def read_boxes(path: str | Path) -> dict[str, np.ndarray]:
    """``image_id`` (or ``patientId``), x, y, width, height CSV -> {image key: xywh boxes in source pixels}."""
    out: dict[str, list] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            key = r.get("image_id") or r.get("patientId") or Path(r["path"]).stem
            box = out.setdefault(key, [])
            if str(r.get("Target", "1")).strip() in ("1", "") and (r.get("width") or "").strip():
                box.append([float(r[k]) for k in ("x", "y", "width", "height")])
    return {k: np.array(v, np.float32).reshape(-1, 4) for k, v in out.items()}
