"""outputs.sc_max_size: a film larger than the cap gets an SC overlay reduced to fit (boxes scaled), while the SR
keeps source coordinates; a film that fits, or a cap of 0, keeps the source's size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import SAMPLES, require

from triage_node import config, dicom_io, own_outputs, pipeline
from triage_node.encoding.sc import _BOX_INDEX
from triage_node.inference.types import Detection, ModelInfo, Prediction

ROOT = Path(__file__).resolve().parent.parent
ROWS, COLS = 2600, 2100  # a DX-sized film, 12 bits stored, uncompressed


@pytest.fixture(scope="module")
def big_film(tmp_path_factory):
    """A DX-sized copy of a real sample, written by the stage benchmark's own generator."""
    path = tmp_path_factory.mktemp("big") / "big.dcm"
    subprocess.run([sys.executable, str(ROOT / "bench" / "big_film.py"), str(path), "--source", str(SAMPLES[0]),
                    "--rows", str(ROWS), "--columns", str(COLS)], check=True, capture_output=True, timeout=120)
    return path


def _pred(rows: int, cols: int) -> Prediction:
    # x, y, width, height in source pixels
    return Prediction(0.9, 0.5, (Detection(600, 1000, 500, 700, 0.8),), ModelInfo("cxr-test", "1.0.0"), rows, cols)


def test_fit_size_and_is_display_of_hand_worked():
    assert dicom_io.fit_size(2600, 2100, 2048) == (2048, 1654)  # 2100 * 2048 / 2600 = 1654.15
    assert dicom_io.fit_size(2100, 2600, 2048) == (1654, 2048)
    assert dicom_io.fit_size(1024, 1024, 2048) == (1024, 1024)  # fits: unchanged
    assert dicom_io.fit_size(2600, 2100, 0) == (2600, 2100)  # 0 = the source's size
    assert own_outputs.is_display_of((2048, 1654), 2600, 2100) and own_outputs.is_display_of((2600, 2100), 2600, 2100)
    assert not own_outputs.is_display_of((2048, 1700), 2600, 2100)  # not the same aspect
    assert not own_outputs.is_display_of((2700, 2181), 2600, 2100)  # larger than the source
    img = np.random.default_rng(0).random((2600, 2100), dtype=np.float32)
    d = dicom_io.display(img, 2048)
    assert d.shape == (2048, 1654) and d.dtype == np.uint8
    assert abs(float(d.mean()) - float(dicom_io.display(img).mean())) < 0.5  # an area average, not a crop
    assert dicom_io.display(img[:1000, :800], 2048).shape == (1000, 800)


def test_big_film_gets_a_reduced_overlay_with_scaled_boxes(tmp_path, big_film):
    require("dciodvfy")
    cfg = config.Config(outputs=config.OutputConfig(archive_dir=""))
    assert cfg.outputs.sc_max_size == 2048
    pred = _pred(ROWS, COLS)
    # the infer worker's path: it caches the full-size rendering, the report worker reduces it (header read only)
    img = dicom_io.pixels(dicom_io.read(big_film))
    pipeline.save_display(tmp_path / "out" / pipeline.DISPLAY_CACHE, dicom_io.display(img))
    files = pipeline.build(big_film, pred, cfg, tmp_path / "out")
    sc = pydicom.dcmread(next(f for f in files if f.name.startswith("sc-")))
    assert (sc.Rows, sc.Columns) == (2048, 1654)
    assert f"reduced from {ROWS} x {COLS} to 2048 x 1654" in sc.DerivationDescription
    idx = sc.pixel_array  # palette indices
    s = 2048 / ROWS
    # the box's left edge at the scaled x (600 * s = 473), halfway down the scaled box
    y_mid = round((1000 + 350) * s)
    assert (idx[y_mid, round(600 * s) - 1:round(600 * s) + 3] == _BOX_INDEX).any()
    assert not (idx[y_mid, round(600 * s) + 30:round(1100 * s) - 30] == _BOX_INDEX).any()  # inside: not drawn
    assert (idx[y_mid, round(1100 * s) - 3:round(1100 * s) + 1] == _BOX_INDEX).any()  # right edge, scaled
    out = subprocess.run(["dciodvfy", str(next(f for f in files if f.name.startswith("sc-")))],
                         capture_output=True, text=True)
    assert not [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
    # the SR's region stays in source pixels (it references the source image, not the overlay)
    sr = pydicom.dcmread(next(f for f in files if f.name.startswith("sr-")))
    coords = [list(map(float, item.GraphicData)) for item in _walk(sr) if "GraphicData" in item]
    assert coords and any(min(c[0::2]) == pytest.approx(600) and max(c[0::2]) == pytest.approx(1100)
                          for c in coords)
    # no cache (another host): the report worker decodes and reduces the same way
    again = pipeline.build(big_film, pred, cfg, tmp_path / "nocache")
    sc2 = pydicom.dcmread(next(f for f in again if f.name.startswith("sc-")))
    assert np.array_equal(sc2.pixel_array, idx)
    # a cache already reduced to the cap is used as it is
    pipeline.save_display(tmp_path / "small" / pipeline.DISPLAY_CACHE, dicom_io.display(img, 2048))
    third = pipeline.build(big_film, pred, cfg, tmp_path / "small")
    assert np.array_equal(pydicom.dcmread(next(f for f in third if f.name.startswith("sc-"))).pixel_array, idx)


def test_cap_zero_and_films_that_fit_keep_the_source_size(tmp_path, big_film):
    cfg = config.Config(outputs=config.OutputConfig(archive_dir="", sc_max_size=0))
    files = pipeline.build(big_film, _pred(ROWS, COLS), cfg, tmp_path / "full")
    sc = pydicom.dcmread(next(f for f in files if f.name.startswith("sc-")), stop_before_pixels=True)
    assert (sc.Rows, sc.Columns) == (ROWS, COLS) and "reduced" not in sc.DerivationDescription
    cfg = config.Config(outputs=config.OutputConfig(archive_dir=""))
    files = pipeline.build(SAMPLES[0], _pred(1024, 1024), cfg, tmp_path / "rsna")
    sc = pydicom.dcmread(next(f for f in files if f.name.startswith("sc-")), stop_before_pixels=True)
    assert (sc.Rows, sc.Columns) == (1024, 1024)
    with pytest.raises(ValueError, match="sc_max_size"):
        config.OutputConfig(sc_max_size=100)


def _walk(ds):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _walk(item)
