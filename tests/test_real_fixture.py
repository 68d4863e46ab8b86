"""The real-film fixture (tests/data/real/) holds what the tests need and is what make_fixture.py makes of the pool."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import REAL_DATA, ROOT, shared_data


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_fixture_holds_every_film_the_shipped_model_held_out():
    """The shipped model's skill tests (test_inf_package.py) score its whole NIH test split and 40 + 40 Kermany test
    films: after a new model ships, make_fixture.py must be run again, and this says so first."""
    split = json.loads((ROOT / "models" / "demo" / "split.json").read_text())
    nih = _rows(REAL_DATA / "nih" / "labels.csv")
    for name in ("nih_adult", "nih_clean"):  # a film in both sets is there once, under the first
        missing = set(split.get(name, {}).get("test", [])) - {r["image_id"] for r in nih}
        assert not missing, f"{len(missing)} {name} test films of the shipped model not in the fixture: regenerate it"
    kermany = _rows(REAL_DATA / "kermany" / "labels.csv")
    test = set(split["kermany_224"]["test"])
    assert all(Path(r["path"]).stem in test for r in kermany), "Kermany fixture films outside the model's test split"
    assert sorted(r["label"] for r in kermany).count("1") == 40 == len(kermany) - 40
    for folder, rows in (("nih", nih), ("kermany", kermany)):
        for r in rows:
            digest = hashlib.sha256((REAL_DATA / folder / r["path"]).read_bytes()).hexdigest()
            assert digest == r["sha256"], f"{folder}/{r['path']} changed"
    assert {r["view"] for r in nih} == {"AP", "PA"} and {r["label"] for r in nih} == {"0", "1"}
    assert {r["source"] for r in nih} == {"nih_adult", "nih_clean"}
    assert len(_rows(REAL_DATA / "nih" / "boxes.csv")) == 26
    for r in nih[:3]:
        ds = pydicom.dcmread(REAL_DATA / "nih" / r["path"])
        assert (ds.Rows, ds.Columns) == (256, 256) and ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGBaseline8Bit
    size = sum(f.stat().st_size for f in REAL_DATA.rglob("*") if f.is_file())
    assert size < 8_000_000, f"the fixture is {size / 1e6:.1f} MB: keep it small"


@pytest.mark.shared_data
def test_fixture_is_what_make_fixture_makes_from_the_pool():
    """Provenance: labels as the pool has them, Kermany bytes unchanged, NIH films the pool's films reduced."""
    adult = {r["image_id"]: r for r in _rows(shared_data("nih_adult", "labels.csv"))}
    clean = {r["image_id"]: r for r in _rows(shared_data("nih_clean", "labels.csv"))}
    nih = _rows(REAL_DATA / "nih" / "labels.csv")
    for r in nih:
        pool = (adult if r["source"] == "nih_adult" else clean)[r["image_id"]]
        assert (r["label"], r["view"], r["nih_patient_id"]) == (pool["label"], pool["view"], pool["nih_patient_id"])
    for r in nih[::20]:
        pool = (adult if r["source"] == "nih_adult" else clean)[r["image_id"]]
        big = pydicom.dcmread(shared_data(r["source"], pool["path"])).pixel_array.astype(np.float32)
        small = pydicom.dcmread(REAL_DATA / "nih" / r["path"]).pixel_array.astype(np.float32)
        reduced = big.reshape(256, 4, 256, 4).mean((1, 3))
        assert np.corrcoef(reduced.ravel(), small.ravel())[0, 1] > 0.99, r["image_id"]
    pool_rows = _rows(shared_data("nih_adult", "labels.csv"))
    shipped = _rows(REAL_DATA / "nih" / "pool" / "labels.csv")
    assert [{k: p[k] for k in shipped[0]} for p in pool_rows] == shipped
    original = REAL_DATA / "nih" / "original" / "00000061_012.dcm"
    assert original.read_bytes() == shared_data("nih_adult", "images", "00000061_012.dcm").read_bytes()
    for r in _rows(REAL_DATA / "kermany" / "labels.csv"):
        assert (REAL_DATA / "kermany" / r["path"]).read_bytes() == shared_data("kermany_224", r["path"]).read_bytes()
