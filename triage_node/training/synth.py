"""Synthetic RSNA-format chest radiographs: procedural anatomy, soft opacities, distractors, real DICOM output.

Box positions, sizes and per-image counts come from real RSNA box sets (``triage_node/data/rsna_box_stats.json``,
built from ``stage_2_train_labels.csv`` with ``--build-stats``). Images are written exactly like the RSNA files:
Secondary Capture with Modality CR, JPEG Baseline, 1024x1024, MONOCHROME2, 8 bit. Not a medical image.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)
STATS_PATH = Path(__file__).resolve().parent.parent / "data" / "rsna_box_stats.json"
RSNA_SIZE = 1024


@dataclass
class SynthCase:
    """One synthetic radiograph. ``boxes`` are (x, y, width, height) in pixels of ``image``."""

    image: np.ndarray  # uint8 HxW, MONOCHROME2
    boxes: np.ndarray  # float32 (n, 4) xywh
    lung_mask: np.ndarray  # bool HxW
    view: str
    distractors: tuple[str, ...] = ()

    @property
    def positive(self) -> bool:
        return len(self.boxes) > 0


# ----------------------------------------------------------------------------------------------- box statistics
def build_box_stats(labels_csv: str | Path, n_sets: int = 2500, grid: int = 64, seed: int = 0) -> dict:
    """Summarise the real RSNA labels: positive ratio, box-count histogram, sampled box sets, coverage heatmap."""
    sets: dict[str, list[list[float]]] = {}
    with open(labels_csv, newline="") as f:
        for r in csv.DictReader(f):
            sets.setdefault(r["patientId"], [])
            if r["Target"] == "1":
                sets[r["patientId"]].append([float(r[k]) for k in ("x", "y", "width", "height")])
    pos = [v for v in sets.values() if v]
    counts = {str(k): sum(1 for v in pos if len(v) == k) for k in range(1, 5)}
    heat = np.zeros((grid, grid), np.float64)
    s = grid / RSNA_SIZE
    for v in pos:
        for x, y, w, h in v:
            heat[int(y * s): max(int(math.ceil((y + h) * s)), int(y * s) + 1),
                 int(x * s): max(int(math.ceil((x + w) * s)), int(x * s) + 1)] += 1
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(pos), size=min(n_sets, len(pos)), replace=False)
    return {
        "source": "RSNA Pneumonia Detection Challenge stage_2_train_labels.csv (RSNA/STR 2018)",
        "image_size": RSNA_SIZE,
        "n_images": len(sets),
        "n_positive": len(pos),
        "n_boxes": int(sum(len(v) for v in pos)),
        "positive_ratio": len(pos) / len(sets),
        "box_count_hist": counts,
        "box_sets": [[[int(round(c)) for c in b] for b in pos[i]] for i in idx],
        "coverage_grid": grid,
        "coverage": np.round(heat / heat.max(), 4).tolist(),
    }


@lru_cache(maxsize=1)
def load_box_stats(path: str | None = None) -> dict:
    with open(path or STATS_PATH) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------- rendering
def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0,1] (bilinear upsampling of a coarse random grid)."""
    g = rng.random((cells + 1, cells + 1)).astype(np.float32)
    im = Image.fromarray(g, mode="F").resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(im)


def _ellipse(xx, yy, cx, cy, ax, ay, soft=0.04):
    r = np.sqrt(((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2)
    return np.clip((1.0 - r) / soft, 0.0, 1.0)


def _blob(xx, yy, cx, cy, sx, sy, rot=0.0):
    c, s = math.cos(rot), math.sin(rot)
    u, v = (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c
    return np.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2))


def _anatomy(rng, xx, yy):
    """Torso, lungs (mask), mediastinum, heart, ribs, diaphragm. Returns (image, lung_soft, torso)."""
    cx = 0.5 + rng.normal(0, 0.015)
    torso = _ellipse(xx, yy, cx, 0.56 + rng.normal(0, 0.02), rng.uniform(0.40, 0.47), rng.uniform(0.58, 0.68), 0.08)
    torso = np.maximum(torso, _ellipse(xx, yy, cx, 0.08, rng.uniform(0.38, 0.48), 0.2, 0.1))  # shoulders
    img = 0.04 + 0.46 * torso
    lungs = np.zeros_like(xx)
    dx, cy = rng.uniform(0.19, 0.22), rng.uniform(0.46, 0.52)
    for side in (-1, 1):
        ax, ay = rng.uniform(0.15, 0.185), rng.uniform(0.31, 0.37)
        lc = cx + side * (dx + rng.normal(0, 0.01))
        lung = _ellipse(xx, yy, lc, cy + rng.normal(0, 0.015), ax, ay, 0.12)
        dome = yy > (cy + 0.8 * ay - 0.35 * ((xx - lc) / ax) ** 2 + side * 0.02)  # diaphragm dome
        lungs = np.maximum(lungs, lung * ~dome)
    heart = _ellipse(xx, yy, cx + rng.uniform(0.03, 0.07), rng.uniform(0.62, 0.68), rng.uniform(0.11, 0.14),
                     rng.uniform(0.09, 0.12), 0.4)
    medi = _ellipse(xx, yy, cx, 0.38, rng.uniform(0.05, 0.07), 0.36, 0.3)
    lungs = lungs * (1 - np.maximum(heart, medi))
    img = img - rng.uniform(0.24, 0.32) * lungs + 0.06 * heart + 0.08 * medi
    # ribs: curved periodic bands over the chest
    spacing = rng.uniform(0.065, 0.08)
    curve = rng.uniform(0.6, 1.0) * (xx - cx) ** 2 + 0.1 * np.abs(xx - cx)
    phase = (yy - curve) / spacing
    ribs = np.clip(np.cos(2 * np.pi * phase) * 2.5 - 1.3, 0, 1) * torso * (yy < cy + 0.3)
    img = img + rng.uniform(0.04, 0.08) * ribs
    spine = _ellipse(xx, yy, cx, 0.5, 0.025, 0.55, 0.5)
    img = img + 0.05 * spine
    return img, lungs, torso


def _opacity(rng, xx, yy, box_n, texture):
    x, y, w, h = box_n
    b = _blob(xx, yy, x + w / 2, y + h / 2, w / 3.6, h / 3.6, rng.normal(0, 0.15))
    return b * (0.6 + 0.4 * texture)


def _sample_boxes(rng, lung_mask_w, stats, tries=40) -> np.ndarray:
    """Real RSNA box sets (normalised), accepted where each box centre is in the lungs and >=50% of it overlaps."""
    h, w = lung_mask_w.shape
    sets = stats["box_sets"]

    def ok(b):
        x0, y0 = int(b[0] * w), int(b[1] * h)
        x1, y1 = max(int(math.ceil((b[0] + b[2]) * w)), x0 + 1), max(int(math.ceil((b[1] + b[3]) * h)), y0 + 1)
        cxp, cyp = min(int((b[0] + b[2] / 2) * w), w - 1), min(int((b[1] + b[3] / 2) * h), h - 1)
        return lung_mask_w[cyp, cxp] and lung_mask_w[y0:y1, x0:x1].mean() >= 0.5

    for _ in range(tries):
        bs = np.array(sets[rng.integers(len(sets))], np.float64) / stats["image_size"]
        if all(ok(b) for b in bs):
            return bs
    # fallback: one box shrunk around a random lung pixel until it fits
    ys, xs = np.nonzero(lung_mask_w)
    i = rng.integers(len(xs))
    b = np.array(sets[rng.integers(len(sets))][0], np.float64) / stats["image_size"]
    cxn, cyn = (xs[i] + 0.5) / w, (ys[i] + 0.5) / h
    while True:
        cand = np.array([cxn - b[2] / 2, cyn - b[3] / 2, b[2], b[3]])
        if ok(cand) or b[2] < 4 / w:
            return cand[None]
        b[2:] *= 0.8


def render_case(rng: np.random.Generator, size: int = RSNA_SIZE, positive: bool | None = None,
                stats: dict | None = None, distractor_p: float = 0.6) -> SynthCase:
    """Render one synthetic chest radiograph of ``size`` x ``size`` pixels."""
    stats = stats or load_box_stats()
    work = max(128, size // 4)
    g = (np.arange(work, dtype=np.float32) + 0.5) / work
    xx, yy = np.meshgrid(g, g)
    img, lungs, torso = _anatomy(rng, xx, yy)
    lung_mask_w = lungs > 0.5
    if positive is None:
        positive = rng.random() < stats["positive_ratio"]
    boxes_n = _sample_boxes(rng, lung_mask_w, stats) if positive else np.zeros((0, 4))
    texture = _smooth_noise(rng, work, work, 8)
    for b in boxes_n:
        img = img + rng.uniform(0.14, 0.26) * _opacity(rng, xx, yy, b, texture) * np.clip(lungs * 1.5, 0, 1)
    distractors = []
    if rng.random() < distractor_p:
        kinds = rng.choice(["outside_opacity", "wire", "leads", "marker"], size=rng.integers(1, 3), replace=False)
        for k in kinds:
            distractors.append(str(k))
            if k == "outside_opacity":  # opacity-like blob where the lungs are not: neck, abdomen, chest wall
                for _ in range(20):
                    c = rng.uniform([0.05, 0.05], [0.95, 0.97])
                    if lungs[int(c[1] * work), int(c[0] * work)] < 0.05:
                        break
                sz = rng.uniform(0.06, 0.14, 2)
                img = img + rng.uniform(0.12, 0.2) * _opacity(rng, xx, yy, (c[0] - sz[0], c[1] - sz[1], 2 * sz[0],
                                                                          2 * sz[1]), texture) * (1 - lungs)
            elif k == "wire":
                t = rng.uniform(0, 1)
                path_y = t + 0.15 * np.sin(xx * rng.uniform(3, 9) + rng.uniform(0, 6))
                img = np.maximum(img, 0.9 * (np.abs(yy - path_y) < 0.004))
            elif k == "leads":
                for _ in range(rng.integers(2, 5)):
                    c = rng.uniform(0.15, 0.85, 2)
                    img = np.maximum(img, 0.95 * _ellipse(xx, yy, c[0], c[1], 0.012, 0.012, 0.3))
            else:
                c = rng.uniform([0.05, 0.03], [0.2, 0.12])
                img = np.maximum(img, 0.95 * (np.abs(xx - c[0]) < 0.02) * (np.abs(yy - c[1]) < 0.025))
    img = img * (0.9 + 0.2 * _smooth_noise(rng, work, work, 4))
    full = np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize((size, size),
                                                                               Image.Resampling.BILINEAR))
    full = full + rng.normal(0, rng.uniform(0.008, 0.02), (size, size)).astype(np.float32)
    lo, hi = rng.uniform(0.0, 0.05), rng.uniform(0.75, 0.95)
    full = np.clip((full - lo) / (hi - lo), 0, 1) ** rng.uniform(0.8, 1.2)
    image = (full * 255 + 0.5).astype(np.uint8)
    mask_im = Image.fromarray(lung_mask_w.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST)
    mask = np.asarray(mask_im) > 127
    boxes = (boxes_n * size).astype(np.float32)
    view = "PA" if rng.random() < 0.55 else "AP"
    return SynthCase(image, boxes, mask, view, tuple(distractors))


def generate(n: int, size: int = RSNA_SIZE, seed: int = 0, **kw):
    """Yield ``n`` reproducible cases; case ``i`` depends only on (seed, i)."""
    for i in range(n):
        yield render_case(np.random.default_rng([seed, i]), size=size, **kw)


# ----------------------------------------------------------------------------------------------- DICOM output
def to_dicom(case: SynthCase, patient_id: str, seed_key: str, quality: int = 95):
    """Wrap a case as an RSNA-like DICOM dataset (SC, CR, JPEG Baseline, MONOCHROME2, 8 bit)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, JPEGBaseline8Bit, SecondaryCaptureImageStorage, generate_uid

    buf = io.BytesIO()
    Image.fromarray(case.image, mode="L").save(buf, format="JPEG", quality=quality)
    study, series, sop = (generate_uid(entropy_srcs=[seed_key, k]) for k in ("study", "series", "sop"))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, sop
    ds.StudyDate, ds.StudyTime = "19010101", "000000.00"
    ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
    ds.Modality, ds.ConversionType = "CR", "WSD"
    ds.SeriesDescription = f"view: {case.view}"
    ds.PatientName, ds.PatientID = patient_id, patient_id
    ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = "", "O", ""
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", case.view
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "", "1", "1"
    ds.PatientOrientation = ""
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = case.image.shape
    ds.PixelSpacing = [0.168, 0.168]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
    ds.ImageComments = "SYNTHETIC image (triage_node.training.synth), not a patient"
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def write_dataset(out: str | Path, n: int, seed: int = 0, size: int = RSNA_SIZE, **kw) -> Path:
    """Write ``n`` DICOM files plus ``stage_2_train_labels.csv`` (RSNA format) to ``out``. Returns the CSV path."""
    out = Path(out)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, case in enumerate(generate(n, size=size, seed=seed, **kw)):
        pid = str(uuid.UUID(bytes=np.random.default_rng([seed, i, 7]).bytes(16), version=4))
        to_dicom(case, pid, f"{seed}-{i}").save_as(img_dir / f"{pid}.dcm", enforce_file_format=True)
        if case.positive:
            rows += [[pid, *(f"{v:.1f}" for v in b), 1] for b in case.boxes]
        else:
            rows.append([pid, "", "", "", "", 0])
    csv_path = out / "stage_2_train_labels.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patientId", "x", "y", "width", "height", "Target"])
        w.writerows(rows)
    return csv_path


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Write synthetic RSNA-format chest radiographs (DICOM + labels CSV)",
                                add_help=add_help)
    p.add_argument("--n", type=int, default=100, help="number of images")
    p.add_argument("--out", default=".data/synth", help="output folder (images/ + stage_2_train_labels.csv)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=RSNA_SIZE, help="image size in pixels (RSNA: 1024)")
    p.add_argument("--build-stats", metavar="LABELS_CSV", default=None,
                   help="rebuild triage_node/data/rsna_box_stats.json from a real stage_2_train_labels.csv and exit")
    return p


def main(args: argparse.Namespace) -> int:
    if args.build_stats:
        STATS_PATH.parent.mkdir(parents=True, exist_ok=True)
        STATS_PATH.write_text(json.dumps(build_box_stats(args.build_stats), separators=(",", ":")))
        print(f"wrote {STATS_PATH}")
        return 0
    csv_path = write_dataset(args.out, args.n, seed=args.seed, size=args.size)
    print(f"wrote {args.n} DICOM files and {csv_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
