"""Pixel decoding for every accepted transfer syntax (files converted by DCMTK, a third-party encoder),
LUT / photometric handling, eligibility rules."""

from __future__ import annotations

import subprocess

import numpy as np
import pydicom
import pytest
from conftest import SAMPLES, require
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from triage_node import dicom_io
from triage_node.config import EligibilityConfig
from triage_node.errors import BadDataset, NotEligible


@pytest.fixture(scope="module")
def uncompressed(tmp_path_factory):
    """A sample decoded once to Explicit VR Little Endian (the lossless reference)."""
    ds = pydicom.dcmread(SAMPLES[0])
    ds.decompress()
    path = tmp_path_factory.mktemp("ts") / "raw.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _dcmtk(tool: str, args: list[str], src, dst) -> None:
    require(tool)
    out = subprocess.run([tool, *args, str(src), str(dst)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("tool, args, ts", [
    ("dcmconv", ["+td"], "1.2.840.10008.1.2.1.99"),      # deflated explicit VR little endian
    ("dcmconv", ["+ti"], "1.2.840.10008.1.2"),           # implicit VR little endian
    ("dcmcjpeg", ["+e1"], "1.2.840.10008.1.2.4.70"),     # JPEG Lossless SV1
    ("dcmcjpeg", ["+el"], "1.2.840.10008.1.2.4.57"),     # JPEG Lossless
    ("dcmcrle", [], "1.2.840.10008.1.2.5"),              # RLE Lossless
    ("dcmcjpls", [], "1.2.840.10008.1.2.4.80"),          # JPEG-LS Lossless
])
def test_lossless_syntaxes_decode_identically(uncompressed, tmp_path, tool, args, ts):
    dst = tmp_path / "conv.dcm"
    _dcmtk(tool, args, uncompressed, dst)
    ds = pydicom.dcmread(dst)
    assert str(ds.file_meta.TransferSyntaxUID) == ts
    ref = dicom_io.pixels(pydicom.dcmread(uncompressed))
    np.testing.assert_array_equal(dicom_io.pixels(ds), ref)


def test_jpeg2000_and_baseline_decode(uncompressed, tmp_path):
    ds = pydicom.dcmread(uncompressed)
    ds.compress(JPEG2000Lossless)
    ref = dicom_io.pixels(pydicom.dcmread(uncompressed))
    np.testing.assert_array_equal(dicom_io.pixels(ds), ref)
    baseline = dicom_io.pixels(pydicom.dcmread(SAMPLES[0]))  # the original JPEG Baseline file
    assert np.abs(baseline - ref).max() <= 1 / 255 + 1e-6


def test_monochrome1_is_inverted():
    a = pydicom.dcmread(SAMPLES[0])
    b = pydicom.dcmread(SAMPLES[0])
    b.PhotometricInterpretation = "MONOCHROME1"
    np.testing.assert_allclose(dicom_io.pixels(b), 1.0 - dicom_io.pixels(a), atol=1e-6)


def _dx16(rows=600, cols=500, window=True) -> pydicom.Dataset:
    ds = pydicom.dcmread(SAMPLES[0])
    ds.decompress()
    img = (ds.pixel_array[:rows, :cols].astype(np.uint16) * 16)  # 12-bit range
    ds.SOPClassUID = dicom_io.DX_PRESENTATION
    ds.Modality = "DX"
    ds.Rows, ds.Columns = img.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -100
    if window:
        ds.WindowCenter, ds.WindowWidth = 1900, 3800
    ds.PixelData = img.tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def test_16bit_dx_with_rescale_and_window_any_size():
    ds = _dx16()
    img = dicom_io.pixels(ds)
    assert img.shape == (600, 500) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0.05
    dicom_io.check_eligible(ds, EligibilityConfig())


def test_decompression_bomb_refused_before_decoding():
    ds = _dx16()
    ds.Rows, ds.Columns = 60000, 60000
    with pytest.raises(BadDataset, match="too large"):
        dicom_io.pixels(ds, max_pixels=50_000_000)


def test_bits_mismatch_and_missing_pixels_are_bad_datasets():
    ds = _dx16()
    ds.BitsStored = 20
    with pytest.raises(BadDataset, match="BitsStored"):
        dicom_io.pixels(ds)
    ds = _dx16()
    ds.PixelData = ds.PixelData[:1000]
    with pytest.raises(BadDataset):
        dicom_io.pixels(ds)


@pytest.mark.parametrize("change, reason", [
    ({"NumberOfFrames": 3}, "multi-frame"),
    ({"SamplesPerPixel": 3}, "not grayscale"),
    ({"PhotometricInterpretation": "RGB"}, "photometric RGB"),
    ({"ViewPosition": "LATERAL"}, "lateral"),
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"}, "SOP class"),
])
def test_eligibility_reasons(change, reason):
    ds = pydicom.dcmread(SAMPLES[0], stop_before_pixels=True)
    for k, v in change.items():
        setattr(ds, k, v)
    ds.PixelData = b"\0\0"
    with pytest.raises(NotEligible, match=reason):
        dicom_io.check_eligible(ds, EligibilityConfig())


def test_configurable_views():
    ds = pydicom.dcmread(SAMPLES[0], stop_before_pixels=True)
    ds.PixelData = b"\0\0"
    ds.ViewPosition = "LL"
    dicom_io.check_eligible(ds, EligibilityConfig(allow_lateral=True))
    ds.ViewPosition = ""
    dicom_io.check_eligible(ds, EligibilityConfig())
    with pytest.raises(NotEligible, match="unknown"):
        dicom_io.check_eligible(ds, EligibilityConfig(allow_unknown_view=False))
    ds.BodyPartExamined = ""
    ds.ViewPosition = "PA"
    dicom_io.check_eligible(ds, EligibilityConfig())  # blank body part is accepted


def _window_reference(raw: np.ndarray, padding: np.ndarray | None, invert: bool) -> np.ndarray:
    """The general path of dicom_io._pixels for stored integers: np.percentile of a float copy, clip, invert."""
    return dicom_io._window_by_percentile(raw.astype(np.float32), padding, invert)


@pytest.mark.parametrize("dtype,low,high", [(np.uint8, 0, 256), (np.uint16, 0, 4096), (np.int16, -3000, 3000),
                                            (np.uint16, 1000, 1003)])
def test_window_by_table_equals_the_percentile_path(dtype, low, high):
    rng = np.random.default_rng(int(high))
    for trial in range(12):
        raw = rng.integers(low, high, size=(97, 131)).astype(dtype)
        pad = rng.random(raw.shape) < 0.1 if trial % 2 else None
        if trial % 4 == 1:
            raw[pad] = raw.max()  # padding at the top of the range: outside the histogram, inside the table
        for invert in (False, True):
            got = dicom_io._window_by_table(raw, pad, invert)
            assert got.dtype == np.float32 and got.shape == raw.shape
            assert np.array_equal(got, _window_reference(raw, pad, invert)), (dtype, trial, invert)
    flat = np.full((8, 8), 7, np.uint8)  # one value: hi <= lo
    assert np.array_equal(dicom_io._window_by_table(flat, None, False), _window_reference(flat, None, False))
    assert not dicom_io._window_by_table(flat, np.ones((8, 8), bool), False).any()  # everything padding


def test_real_jpeg_baseline_films_decode_and_window_as_the_general_path():
    """Pillow first for JPEG Baseline: the same pixels as pydicom's default decoder order; the table window: the
    same image as the percentile path (RSNA samples, MONOCHROME1 variant)."""
    from pydicom.pixels import pixel_array

    assert SAMPLES
    for f in SAMPLES:
        ds = pydicom.dcmread(f)
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
        raw = pixel_array(ds, decoding_plugin="gdcm") if _has_gdcm() else ds.pixel_array
        assert np.array_equal(dicom_io._decode(ds), raw)
        invert = ds.PhotometricInterpretation == "MONOCHROME1"
        assert np.array_equal(dicom_io.pixels(ds), _window_reference(raw, dicom_io._padding(raw, ds), invert))


def _has_gdcm() -> bool:
    try:
        import gdcm  # noqa: F401
    except ImportError:
        return False
    return True


def _general_reference(ds: pydicom.Dataset, raw: np.ndarray) -> np.ndarray:
    """The general path for any pixel values: pydicom's Modality LUT and VOI LUT over the whole image, then
    np.percentile of a float32 copy (what dicom_io did for every film with a rescale or a window before the table)."""
    from pydicom.pixels import apply_voi_lut

    arr = dicom_io._modality_lut(raw, ds)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        arr = apply_voi_lut(arr, ds, prefer_lut=True)
    invert = ds.PhotometricInterpretation == "MONOCHROME1" or ds.get("PresentationLUTShape") == "INVERSE"
    return dicom_io._window_by_percentile(np.asarray(arr, dtype=np.float32), dicom_io._padding(raw, ds), invert)


def _film(raw: np.ndarray, bits: int, **attrs) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = raw.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = raw.dtype.itemsize * 8, bits, bits - 1
    ds.PixelRepresentation = int(raw.dtype.kind == "i")
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.PixelData = raw.tobytes()
    return ds


_VOI_LUT = pydicom.Dataset()
_VOI_LUT.LUTDescriptor = [4096, 0, 16]
_VOI_LUT.LUTData = [int(65535 * (i / 4095) ** 0.6) for i in range(4096)]  # a non-linear (gamma) VOI LUT

# what CR/DX vendors put in the header: a window, a rescale (integer, fractional, decreasing), a sigmoid window, a
# VOI LUT Sequence, MONOCHROME1, Presentation LUT Shape INVERSE, pixel padding, signed pixels, two windows
_MAPPINGS = [
    {"WindowCenter": 2048, "WindowWidth": 4000},
    {"RescaleSlope": 1, "RescaleIntercept": -1024, "WindowCenter": 900, "WindowWidth": 2500},
    {"RescaleSlope": 0.37, "RescaleIntercept": 3.7, "WindowCenter": 700.5, "WindowWidth": 901.25},
    {"RescaleSlope": -1, "RescaleIntercept": 4095},
    {"WindowCenter": 1800, "WindowWidth": 1500, "VOILUTFunction": "SIGMOID"},
    {"VOILUTSequence": [_VOI_LUT]},
    {"WindowCenter": [2048, 1000], "WindowWidth": [4096, 800], "PhotometricInterpretation": "MONOCHROME1"},
    {"RescaleSlope": 2, "RescaleIntercept": 0, "WindowCenter": 3000, "WindowWidth": 5000,
     "PresentationLUTShape": "INVERSE"},
    {"WindowCenter": 1500, "WindowWidth": 3000, "PixelPaddingValue": 0},
]


@pytest.mark.parametrize("attrs", _MAPPINGS, ids=range(len(_MAPPINGS)))
def test_the_table_path_with_a_rescale_or_a_window_equals_the_general_path(attrs):
    """Films with a Modality LUT (rescale) or a VOI LUT (window) go through the stored-value table too: the same
    image as pydicom's functions over every pixel and np.percentile, bit for bit (random 12-bit films, a real one)."""
    rng = np.random.default_rng(7)
    real = pydicom.dcmread(SAMPLES[0]).pixel_array.astype(np.uint16) * 16  # a real film, 12 bits
    films = [rng.integers(0, 4096, size=(97, 131)).astype(np.uint16), real]
    films[0][:5] = 0  # a border of padding (where PixelPaddingValue says so)
    for raw in films:
        ds = _film(raw, 12, **attrs)
        got = dicom_io.pixels(ds)
        assert got.dtype == np.float32 and got.shape == raw.shape
        assert np.array_equal(got, _general_reference(ds, raw)), attrs


def test_the_table_path_for_signed_and_8_bit_films_with_a_rescale():
    rng = np.random.default_rng(3)
    signed = rng.integers(-2000, 2000, size=(64, 80)).astype(np.int16)
    ds = _film(signed, 16, RescaleSlope=1.5, RescaleIntercept=-100, WindowCenter=-50, WindowWidth=3000)
    assert np.array_equal(dicom_io.pixels(ds), _general_reference(ds, signed))
    small = rng.integers(0, 256, size=(64, 80)).astype(np.uint8)
    ds = _film(small, 8, RescaleSlope=0.5, RescaleIntercept=10)
    assert np.array_equal(dicom_io.pixels(ds), _general_reference(ds, small))
    flat = np.full((16, 16), 300, np.uint16)  # one value: the window falls back to min / max, as the general path
    ds = _film(flat, 12, WindowCenter=100, WindowWidth=50)
    assert np.array_equal(dicom_io.pixels(ds), _general_reference(ds, flat))
