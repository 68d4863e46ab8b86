"""Shared helpers for the encoding tests: sample sources, predictions, DICOM validators (no tests here)."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from triage_node.inference.types import Detection, ModelInfo, Prediction

REPO = Path(__file__).resolve().parents[1]


def rsna_paths() -> list[Path]:
    """The real RSNA samples that ship in the repository's sample_dicom/ (first 5)."""
    return sorted((REPO / "sample_dicom").glob("*.dcm"))[:5]


RSNA = rsna_paths()
MODEL = ModelInfo(name="test-model", version="0.0.1", demo=True)
BOXES = (Detection(100.0, 200.0, 300.0, 250.0, 0.87), Detection(400.5, 150.25, 200.0, 300.0, 0.55))


def prediction(boxes=BOXES, probability: float = 0.87, model: ModelInfo = MODEL, rows: int = 0,
               columns: int = 0) -> Prediction:
    return Prediction(probability=probability, threshold=0.5, detections=tuple(boxes), model=model,
                      rows=rows, columns=columns)


def display_of(ds: Dataset) -> np.ndarray:
    """A crude 8-bit MONOCHROME2 rendering (the real one lives in dicom_io; any uint8 image of the right size works)."""
    arr = ds.pixel_array.astype(np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    out = (arr - lo) / max(hi - lo, 1.0) * 255.0
    if ds.PhotometricInterpretation == "MONOCHROME1":
        out = 255.0 - out
    return out.astype(np.uint8)


def synthetic_xray(kind: str = "dx", monochrome1: bool = False, rows: int = 512, columns: int = 640) -> Dataset:
    """A 16-bit DX (for presentation / processing) or CR source with a few typical header defects."""
    sop_class = {
        "dx": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
        "dx-proc": "1.2.840.10008.5.1.4.1.1.1.1.1",  # - For Processing
        "cr": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    }[kind]
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["enc-test", kind, str(monochrome1)])
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["enc-test-study", kind])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["enc-test-series", kind, str(monochrome1)])
    ds.Modality = "CR" if kind == "cr" else "DX"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "TEST-0001"
    ds.PatientBirthDate = "19600102"
    ds.PatientSex = "f"  # lower case: invalid CS, repairable
    ds.PatientAge = "63"  # invalid AS, repairable
    ds.StudyDate = "20240102"
    ds.StudyTime = "10:22:33"  # ACR-NEMA style TM, repairable
    ds.AccessionNumber = "A123"
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = 3
    ds.InstanceNumber = 1
    ds.Manufacturer = "ACME Radiography"
    ds.InstitutionName = "X" * 80  # too long for LO: dropped
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ImagerPixelSpacing = ["0.1430000000000001", "0.143"]  # long DS
    ds.PixelSpacing = ["0.1430000000000001", "0.143"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if kind.startswith("dx"):
        ds.PresentationIntentType = "FOR PROCESSING" if kind == "dx-proc" else "FOR PRESENTATION"
        ds.DetectorType = "SCINTILLATOR"
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
        ds.BurnedInAnnotation = "NO"
        ds.Laterality = ""
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    yy, xx = np.mgrid[0:rows, 0:columns]
    ds.PixelData = ((xx * 3 + yy * 2) % 4096).astype(np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return roundtrip(ds)


def roundtrip(ds: Dataset) -> Dataset:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def write(ds: Dataset, path: Path) -> Path:
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def _tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        pytest.skip(f"{name} not installed (Debian package {'dicom3tools' if name == 'dciodvfy' else 'dcmtk'})")
    return exe


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """Run dciodvfy; return (errors, warnings). Fails the test if the tool crashes."""
    proc = subprocess.run([_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [ln for ln in lines if re.match(r"^\s*Error", ln)]
    warnings = [ln for ln in lines if re.match(r"^\s*Warning", ln)]
    return errors, warnings


def dsrdump(path: Path) -> str:
    proc = subprocess.run([_tool("dsrdump"), str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def dcmpschk(path: Path) -> str:
    proc = subprocess.run([_tool("dcmpschk"), str(path)], capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Test passed" in out and not re.search(r"^E:", out, re.M), out
    return out
