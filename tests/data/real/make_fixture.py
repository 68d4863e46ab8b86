"""Regenerate the real-film test fixture (tests/data/real/) from the project's shared data folder.

    python tests/data/real/make_fixture.py [--shared ../shared/data] [--model models/demo]

The only code in the repository that reads ``../shared``: the tests read what this script wrote. It picks

- ``nih/``: NIH ChestX-ray14 films in the RSNA-style DICOM of ``nih_adult`` and ``nih_clean``, re-encoded at 256 px
  (JPEG Baseline, PixelSpacing and boxes rescaled, new Series/SOP Instance UIDs derived from the old ones):
  every film of the shipped model's held-out NIH test splits (``<model>/split.json``: ``nih_adult`` and, when it has
  one, ``nih_clean``; so its skill test runs here), the first 12 positive and 12 negative rows of ``nih_adult``
  (small training runs), 4 films per class and view of ``nih_clean`` (a film in both sets is kept once, as
  ``nih_adult``); ``nih/original/00000061_012.dcm`` byte for byte (1024 px; the oddities corpus is built from it);
  and ``nih/pool/``: the whole ``nih_adult`` labels and boxes tables, without images (split, fold and weight tests);
- ``kermany/``: Kermany pediatric films as in ``kermany_224`` (224 px JPEG, bytes unchanged): the first 40 positive
  and 40 negative films of the shipped model's Kermany test split, in the same ``labels.csv`` layout; and
  ``kermany/val/``: the 12 full-size ``cxr_samples/kermany_pediatric`` films reduced to 512 px on the long side.

Run it again after the shipped model changes (its split decides the NIH and Kermany test films), then commit.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, generate_uid

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
SIZE = 256  # NIH films: 1024 -> 256 (the demo model reads 192 px)
VAL_LONG_SIDE = 512
ODDITY_SOURCE = "00000061_012"
NIH_COLUMNS = ["path", "label", "image_id", "nih_patient_id", "age", "sex", "view", "nih_findings", "n_boxes",
               "source", "sha256"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def downsize_dicom(src: Path, dst: Path, size: int = SIZE) -> None:
    """The film at ``size`` x ``size``, JPEG Baseline quality 90; PixelSpacing scaled; a derived instance."""
    ds = pydicom.dcmread(src)
    arr = ds.pixel_array
    assert arr.ndim == 2 and arr.dtype == np.uint8, f"{src.name}: expected 8-bit grey"
    scale = arr.shape[0] / size
    small = Image.fromarray(arr).resize((size, round(arr.shape[1] / scale)), Image.Resampling.BOX)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=90)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.Rows, ds.Columns = small.height, small.width
    if "PixelSpacing" in ds:
        ds.PixelSpacing = [f"{float(v) * scale:.6g}" for v in ds.PixelSpacing]
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["test-fixture", str(size), str(ds.SeriesInstanceUID)])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["test-fixture", str(size), str(ds.SOPInstanceUID)])
    ds.DerivationDescription = f"reduced to {size} px and re-encoded (JPEG q90) for the test fixture"
    ds.LossyImageCompression = "01"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(dst, enforce_file_format=True)


def make_nih(shared: Path, split: dict, out: Path) -> None:
    adult, clean = read_csv(shared / "nih_adult" / "labels.csv"), read_csv(shared / "nih_clean" / "labels.csv")
    pick: dict[str, dict] = {}
    for name, rows in (("nih_adult", adult), ("nih_clean", clean)):  # the model's held-out films of either set
        test = set(split.get(name, {}).get("test", []))
        pick |= {r["image_id"]: r | {"source": name} for r in rows if r["image_id"] in test - set(pick)}
    for label in ("1", "0"):  # small training runs take the first 12 of each class
        for r in [r for r in adult if r["label"] == label][:12]:
            pick.setdefault(r["image_id"], r | {"source": "nih_adult"})
    for label in ("1", "0"):
        for view in ("PA", "AP"):
            cell = [r for r in clean if r["label"] == label and r["view"] == view and r["image_id"] not in pick]
            for r in cell[:4]:
                pick[r["image_id"]] = r | {"source": "nih_clean"}
    (out / "images").mkdir(parents=True)
    rows = []
    for key, r in sorted(pick.items(), key=lambda kv: (kv[1]["source"], kv[0])):
        dst = out / "images" / f"{key}.dcm"
        downsize_dicom(shared / r["source"] / r["path"], dst)
        rows.append(r | {"path": f"images/{key}.dcm", "sha256": sha256(dst), "n_boxes": r.get("n_boxes") or "0"})
    write_csv(out / "labels.csv", NIH_COLUMNS, rows)
    scale = SIZE / 1024
    boxes = [b | {"path": f"images/{b['image_id']}.dcm", **{k: f"{float(b[k]) * scale:.2f}"
                                                            for k in ("x", "y", "width", "height")}}
             for b in read_csv(shared / "nih_adult" / "boxes.csv") if b["image_id"] in pick]
    write_csv(out / "boxes.csv", ["image_id", "path", "x", "y", "width", "height", "nih_label"], boxes)
    (out / "original").mkdir()
    shutil.copyfile(shared / "nih_adult" / "images" / f"{ODDITY_SOURCE}.dcm", out / "original" / f"{ODDITY_SOURCE}.dcm")
    # the whole nih_adult table without its images: tests of splits, folds and weights read labels, views and groups
    (out / "pool").mkdir()
    write_csv(out / "pool" / "labels.csv", NIH_COLUMNS[:-2], adult)
    shutil.copyfile(shared / "nih_adult" / "boxes.csv", out / "pool" / "boxes.csv")
    print(f"nih: {len(rows)} films ({sum(r['source'] == 'nih_clean' for r in rows)} nih_clean), {len(boxes)} boxes")


def make_kermany(shared: Path, split: dict, out: Path) -> None:
    src = shared / "kermany_224"
    rows = read_csv(src / "labels.csv")
    test = set(split.get("kermany_224", {}).get("test", []))
    in_test = [r for r in rows if Path(r["path"]).stem in test]
    pick = [r for r in in_test if r["label"] == "1"][:40] + [r for r in in_test if r["label"] == "0"][:40]
    for r in pick:
        (out / r["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / r["path"], out / r["path"])
    write_csv(out / "labels.csv", list(rows[0]), pick)
    val_src = shared / "cxr_samples" / "kermany_pediatric"
    (out / "val").mkdir()
    val_rows = []
    for r in read_csv(val_src / "labels.csv"):
        with Image.open(val_src / r["file"]) as im:
            im = im.convert("L")
            im.thumbnail((VAL_LONG_SIDE, VAL_LONG_SIDE), Image.Resampling.LANCZOS)
            im.save(out / "val" / r["file"], format="JPEG", quality=90)
            val_rows.append(r | {"width": im.width, "height": im.height, "mode": "L"})
    write_csv(out / "val" / "labels.csv", ["file", "label", "width", "height", "mode"], val_rows)
    print(f"kermany: {len(pick)} films of the model's test split, val: {len(val_rows)} films")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", type=Path,
                   default=Path(os.environ.get("TRIAGE_SHARED_DATA") or ROOT.parent / "shared" / "data"))
    p.add_argument("--model", type=Path, default=ROOT / "models" / "demo", help="the package whose split.json to use")
    args = p.parse_args()
    split = json.loads((args.model / "split.json").read_text())
    for name, make in (("nih", make_nih), ("kermany", make_kermany)):
        out = HERE / name
        readme = (out / "README.md").read_text() if (out / "README.md").exists() else None
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        if readme is not None:
            (out / "README.md").write_text(readme)
        make(args.shared, split, out)


if __name__ == "__main__":
    main()
