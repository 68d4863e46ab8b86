"""Readers: RSNA labels CSV, the seed's converted CSV, image-level CSVs, Kermany; patient-level split; images."""

from __future__ import annotations

import csv
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)
IMAGE_EXTS = (".dcm", ".dicom", ".png", ".jpg", ".jpeg", "")


@dataclass
class Sample:
    """One training/eval image held as uint8 at a working size, boxes xywh in pixels of that size."""

    key: str
    image: np.ndarray  # uint8 S x S
    boxes: np.ndarray  # float32 (n, 4) xywh, at image size
    label: int


def read_rsna_labels(path: str | Path) -> OrderedDict[str, np.ndarray]:
    """``patientId,x,y,width,height,Target`` -> {patientId: xywh boxes (n, 4)}; negatives map to (0, 4)."""
    out: OrderedDict[str, list] = OrderedDict()
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            boxes = out.setdefault(r["patientId"], [])
            if str(r.get("Target", "0")).strip() == "1":
                boxes.append([float(r[k]) for k in ("x", "y", "width", "height")])
    return OrderedDict((k, np.array(v, np.float32).reshape(-1, 4)) for k, v in out.items())


def read_converted_csv(path: str | Path) -> OrderedDict[str, np.ndarray]:
    """``image_name,xmin,ymin,xmax,ymax,class_name`` (empty class = negative) -> {image_name: xywh boxes}."""
    out: OrderedDict[str, list] = OrderedDict()
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            boxes = out.setdefault(r["image_name"], [])
            if (r.get("class_name") or "").strip():
                x0, y0, x1, y1 = (float(r[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
                boxes.append([x0, y0, x1 - x0, y1 - y0])
    return OrderedDict((k, np.array(v, np.float32).reshape(-1, 4)) for k, v in out.items())


def read_labels(path: str | Path) -> OrderedDict[str, np.ndarray]:
    """Either box format, detected from the header."""
    with open(path, newline="") as f:
        header = next(csv.reader(f))
    return read_converted_csv(path) if "image_name" in header else read_rsna_labels(path)


def read_image_labels(path: str | Path) -> list[tuple[Path, int]]:
    """``path,label`` CSV (paths relative to the CSV; ``file`` accepted for ``path``; label 0/1 or
    NORMAL/PNEUMONIA) -> [(absolute path, 0/1)]."""
    base = Path(path).parent
    names = {"0": 0, "1": 1, "normal": 0, "pneumonia": 1, "negative": 0, "positive": 1}
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            lab = str(r["label"]).strip().lower()
            out.append((base / (r.get("path") or r["file"]), names[lab] if lab in names else int(float(lab))))
    return out


def patient_id(key: str) -> str:
    """Patient of an image key: the RSNA patientId, or the converted CSV's file name without extension."""
    return Path(key).stem if Path(key).suffix.lower() in IMAGE_EXTS[:-1] else key


def patient_split(keys: list[str], val_frac: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split image keys so that no patient is on both sides; seeded, independent of input order."""
    patients = sorted({patient_id(k) for k in keys})
    rng = np.random.default_rng(seed)
    rng.shuffle(patients)
    n_val = int(round(len(patients) * val_frac))
    val = set(patients[:n_val])
    return [k for k in keys if patient_id(k) not in val], [k for k in keys if patient_id(k) in val]


def find_image(images_dir: str | Path, key: str) -> Path:
    d = Path(images_dir)
    for ext in IMAGE_EXTS:
        p = d / f"{key}{ext}"
        if p.is_file():
            return p
    raise FileNotFoundError(f"no image for {key!r} in {d}")


def window(arr: np.ndarray) -> np.ndarray:
    """The 0.5-99.5 percentile window that dicom_io.pixels applies to files without a VOI LUT."""
    arr = arr.astype(np.float32)
    lo, hi = np.percentile(arr, (0.5, 99.5))
    if hi <= lo:
        lo, hi = float(arr.min()), float(arr.max())
    return np.clip((arr - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


def load_image(path: str | Path) -> np.ndarray:
    """Float32 2-D image in [0,1], MONOCHROME2. DICOM through triage_node.dicom_io.pixels, others via Pillow."""
    p = Path(path)
    if p.suffix.lower() in (".dcm", ".dicom", ""):
        import pydicom

        ds = pydicom.dcmread(p)
        try:
            from triage_node.dicom_io import pixels
        except ImportError:  # pragma: no cover - early in the project
            img = window(ds.pixel_array)
            return 1.0 - img if ds.get("PhotometricInterpretation") == "MONOCHROME1" else img
        return pixels(ds)
    with Image.open(p) as im:
        return window(np.asarray(im.convert("L")))


def to_uint8(img: np.ndarray, size: int) -> np.ndarray:
    im = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BILINEAR)
    return np.array(im)


def load_detection_samples(labels: OrderedDict[str, np.ndarray], keys: list[str], images_dir: str | Path,
                           size: int) -> list[Sample]:
    """Decode images, squash to ``size`` x ``size`` and scale their boxes accordingly."""
    out = []
    for k in keys:
        img = load_image(find_image(images_dir, k))
        sy, sx = size / img.shape[0], size / img.shape[1]
        b = labels[k] * np.array([sx, sy, sx, sy], np.float32)
        out.append(Sample(k, to_uint8(img, size), b, int(len(b) > 0)))
    return out


def synthetic_samples(n: int, size: int, seed: int, positive_ratio: float | None = None) -> list[Sample]:
    """In-memory synthetic cases at ``size`` px, windowed like dicom_io.pixels (fast path for tests)."""
    from triage_node.training.synth import generate, load_box_stats

    stats = load_box_stats() if positive_ratio is None else load_box_stats() | {"positive_ratio": positive_ratio}
    return [Sample(f"synth-{seed}-{i}", to_uint8(window(c.image), size), c.boxes.astype(np.float32), int(c.positive))
            for i, c in enumerate(generate(n, size=size, seed=seed, stats=stats))]


def read_kermany(root: str | Path, size: int, val_frac: float = 0.15, seed: int = 0,
                 limit: int | None = None) -> tuple[list[Sample], list[Sample]]:
    """Kermany 224 train split -> (train, val), val held out by ``id_prefix`` groups (seeded)."""
    root = Path(root)
    with open(root / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "train"]
    if limit:
        rows = [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))[:limit]]
    groups = sorted({r["id_prefix"] for r in rows})
    rng = np.random.default_rng(seed)
    rng.shuffle(groups)
    val_groups = set(groups[: int(round(len(groups) * val_frac))])
    tr: list[Sample] = []
    va: list[Sample] = []
    for r in rows:
        s = Sample(r["path"], to_uint8(load_image(root / r["path"]), size), np.zeros((0, 4), np.float32),
                   int(r["label"]))
        (va if r["id_prefix"] in val_groups else tr).append(s)
    return tr, va
