"""Generate the real-world-oddities corpus from one real NIH film (no hand-edited binaries are committed).

    python tests/oddities/make_corpus.py OUT_DIR [--source tests/data/real/nih/original/00000061_012.dcm]

Writes ``OUT_DIR/<case>.dcm`` and ``OUT_DIR/manifest.json``: per case the file, the SOP Instance UID, what the node
must do with it (``sent``, ``skipped`` or ``dead_lettered``, with a reason fragment for the last two) and how its
display must relate to the plain film's (``same``: same orientation within tolerance; ``None``: no pixel check).

Each case is a variation seen in real archives, built from the film's real pixels:

- header gaps: Type 2 attributes absent; Google's NIH conversion (Implicit VR LE, Modality DX, SC, most Type 2 absent),
  once with BodyPartExamined kept and once exactly as the real file (no BodyPartExamined, Laterality, ViewPosition)
- character sets: ISO_IR 192 (UTF-8), GB18030, ISO 2022 IR 87 (escape sequences); names must reach the SR intact
- private tags and private sequences (nested items)
- LUTs: Modality LUT Sequence + VOI LUT Sequence (12 bit); MONOCHROME1 with Presentation LUT Shape INVERSE;
  MONOCHROME2 with Presentation LUT Shape INVERSE (stored inverted); pixel padding (PixelPaddingValue border)
- matrices: 64 x 64 and 4256 x 3488 (a 43 x 35 cm detector at 100 um); 12-bit and 16-bit signed data
- outcomes other than sent: a lateral view (skipped), 32 bits allocated (dead-lettered: not a legal DX/CR encoding)
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

#: Type 2 attributes of the Patient and General Study modules (and ViewPosition, Type 2 in DX Positioning).
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
         "ReferringPhysicianName", "StudyID", "AccessionNumber", "ViewPosition")
DEFAULT_SOURCE = Path(__file__).resolve().parents[1] / "data" / "real" / "nih" / "original" / "00000061_012.dcm"
#: Patient names that only survive if the character set is carried over correctly (PS3.5 annex examples).
NAMES = {
    "ISO_IR 192": "Müller^Zoë=王^小明",
    "GB18030": "王^小明",
    "ISO 2022 IR 87": "Yamada^Tarou=山田^太郎=やまだ^たろう",
}


def _uid(case: str, what: str, base: Dataset) -> str:
    return generate_uid(entropy_srcs=["oddity", case, what, str(base.SOPInstanceUID)])


def _native(ds: Dataset, arr: np.ndarray, *, bits_stored: int, signed: bool = False,
            syntax: str = ExplicitVRLittleEndian) -> None:
    """Replace the pixel data with ``arr`` uncompressed (8 or 16 bits allocated)."""
    bits_allocated = 8 if bits_stored <= 8 else (16 if bits_stored <= 16 else 32)
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    dtype = {8: np.uint8, 16: np.uint16, 32: np.uint32}[bits_allocated]
    if signed:
        dtype = {8: np.int8, 16: np.int16, 32: np.int32}[bits_allocated]
    ds.PixelData = np.ascontiguousarray(arr.astype(dtype)).tobytes()
    ds["PixelData"].VR = "OB" if bits_allocated == 8 else "OW"
    for kw in ("LossyImageCompression", "LossyImageCompressionMethod", "LossyImageCompressionRatio"):
        ds.pop(kw, None)
    ds.LossyImageCompression = "01"  # the film was JPEG once: once lossy, always lossy
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.file_meta.TransferSyntaxUID = syntax


def _as_dx(ds: Dataset, photometric: str = "MONOCHROME2") -> None:
    """Make the film a DX For Presentation image (the class whose IOD asks for the Presentation LUT Shape)."""
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.Modality = "DX"
    ds.PhotometricInterpretation = photometric
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.DetectorType = "SCINTILLATOR"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.BurnedInAnnotation = "NO"
    ds.ImagerPixelSpacing = ds.get("PixelSpacing", ["0.143", "0.143"])
    ds.pop("ConversionType", None)


def missing_type2(ds: Dataset, arr: np.ndarray) -> dict:
    for kw in TYPE2:
        ds.pop(kw, None)
    return {"expect": "sent", "display": "same"}


def google_dx_implicit(ds: Dataset, arr: np.ndarray) -> dict:
    """As Google's public NIH ChestX-ray14 DICOM conversion: Implicit VR LE, SC class, Modality DX, bare header."""
    keep = {"SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "PatientAge",
            "PatientSex", "BodyPartExamined"}
    for elem in list(ds):
        if elem.keyword not in keep:
            del ds[elem.tag]
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = "DX"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    _native(ds, arr, bits_stored=8, syntax=ImplicitVRLittleEndian)
    for kw in ("LossyImageCompression", "LossyImageCompressionMethod"):
        del ds[kw]
    return {"expect": "sent", "display": "same"}


def google_nih_exact(ds: Dataset, arr: np.ndarray) -> dict:
    """The header of a real NIH film in Google's DICOM conversion, element for element: SOP Class (SC), SOP Instance,
    Modality DX, Study Description, Patient's Name, ID, Sex and Age, Study and Series Instance UIDs and the Image
    Pixel module (8 bit MONOCHROME2), Implicit VR LE. No BodyPartExamined, Laterality, ViewPosition or dates."""
    keep = {"SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "PatientAge",
            "PatientSex", "PatientName"}
    name = str(ds.get("PatientName", "") or "") or str(ds.PatientID)
    for elem in list(ds):
        if elem.keyword not in keep:
            del ds[elem.tag]
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = "DX"
    ds.StudyDescription = "NIH ChestX-ray14"
    ds.PatientName = name
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    _native(ds, arr, bits_stored=8, syntax=ImplicitVRLittleEndian)
    for kw in ("LossyImageCompression", "LossyImageCompressionMethod"):
        del ds[kw]
    return {"expect": "sent", "display": "same"}


def _charset(ds: Dataset, charset: str | list[str], name: str) -> dict:
    ds.SpecificCharacterSet = charset
    ds.PatientName = name
    ds.InstitutionName = name.split("=")[-1].replace("^", " ")
    return {"expect": "sent", "display": "same", "patient_name": name}


def charset_utf8(ds: Dataset, arr: np.ndarray) -> dict:
    return _charset(ds, "ISO_IR 192", NAMES["ISO_IR 192"])


def charset_gb18030(ds: Dataset, arr: np.ndarray) -> dict:
    return _charset(ds, "GB18030", NAMES["GB18030"])


def charset_iso2022_jp(ds: Dataset, arr: np.ndarray) -> dict:
    return _charset(ds, ["", "ISO 2022 IR 87"], NAMES["ISO 2022 IR 87"])


def private_tags(ds: Dataset, arr: np.ndarray) -> dict:
    block = ds.private_block(0x0029, "ACME RADIOGRAPHY 1.0", create=True)
    block.add_new(0x01, "LO", "processing v7")
    block.add_new(0x02, "US", 3)
    item = Dataset()
    inner = item.private_block(0x0031, "ACME NESTED", create=True)
    inner.add_new(0x10, "DS", "1.5")
    item.add_new(0x00081150, "UI", ds.SOPClassUID)  # a standard element inside a private item
    block.add_new(0x03, "SQ", Sequence([item, Dataset()]))
    ds.add_new(0x00111010, "UN", b"\x01\x02\x03\x04")  # an odd private group without a creator
    return {"expect": "sent", "display": "same"}


def modality_voi_lut_sequences(ds: Dataset, arr: np.ndarray) -> dict:
    """12-bit stored values; a Modality LUT Sequence (nonlinear) and a VOI LUT Sequence that undo each other."""
    _as_dx(ds)
    stored = arr.astype(np.uint16) * 16  # 0..4080
    _native(ds, stored, bits_stored=12)
    x = np.arange(4096, dtype=np.float64)
    modality = np.round(4095 * np.sqrt(x / 4095)).astype(np.uint16)  # stored -> "OD" (gamma 0.5)
    mod = Dataset()
    mod.LUTDescriptor = [4096, 0, 12]
    mod.ModalityLUTType = "OD"
    mod.add_new("LUTData", "OW", modality.astype("<u2").tobytes())
    ds.ModalityLUTSequence = [mod]
    voi = Dataset()
    voi.LUTDescriptor = [4096, 0, 12]
    voi.LUTExplanation = "inverse gamma"
    voi.add_new("LUTData", "OW", np.round(4095 * (x / 4095) ** 2).astype("<u2").tobytes())
    ds.VOILUTSequence = [voi]
    return {"expect": "sent", "display": "same", "gsps_modality_lut": True}


def mono1_presentation_inverse(ds: Dataset, arr: np.ndarray) -> dict:
    _as_dx(ds, "MONOCHROME1")
    _native(ds, (255 - arr.astype(np.uint16)) * 16, bits_stored=12)
    return {"expect": "sent", "display": "same", "gsps_presentation_lut": "INVERSE"}


def mono2_presentation_inverse(ds: Dataset, arr: np.ndarray) -> dict:
    """MONOCHROME2 stored inverted with Presentation LUT Shape INVERSE (CR vendors do this; displays as plain)."""
    ds.PresentationLUTShape = "INVERSE"
    _native(ds, (255 - arr.astype(np.uint16)) * 16, bits_stored=12)
    return {"expect": "sent", "display": "same", "gsps_presentation_lut": "INVERSE"}


def pixel_padding(ds: Dataset, arr: np.ndarray) -> dict:
    """A 16-bit film inside a 48-pixel border of PixelPaddingValue (outside the collimated field)."""
    _as_dx(ds)
    stored = arr.astype(np.uint16) * 16
    border = 48
    stored[:border, :] = stored[-border:, :] = 65535
    stored[:, :border] = stored[:, -border:] = 65535
    _native(ds, stored, bits_stored=16)
    ds.PixelPaddingValue = 65535
    ds["PixelPaddingValue"].VR = "US"
    return {"expect": "sent", "display": "same", "border": border}


def matrix_tiny(ds: Dataset, arr: np.ndarray) -> dict:
    _native(ds, arr[::16, ::16], bits_stored=8)  # 64 x 64
    ds.PixelSpacing = [f"{float(v) * 16:.6g}" for v in ds.PixelSpacing]
    return {"expect": "sent", "display": "same"}


def matrix_large(ds: Dataset, arr: np.ndarray) -> dict:
    """4256 x 3488 16 bit (a 43 x 35 cm detector at 100 um, ~30 MB): nearest-neighbour upsampling of the film."""
    rows, cols = 4256, 3488
    ri = (np.arange(rows) * arr.shape[0] // rows)[:, None]
    ci = (np.arange(cols) * arr.shape[1] // cols)[None, :]
    _as_dx(ds)
    _native(ds, arr[ri, ci].astype(np.uint16) * 64, bits_stored=14)
    ds.ImagerPixelSpacing = ds.PixelSpacing = ["0.1", "0.1"]
    return {"expect": "sent", "display": "same"}


def signed_12bit(ds: Dataset, arr: np.ndarray) -> dict:
    _as_dx(ds)
    _native(ds, arr.astype(np.int16) * 16 - 2048, bits_stored=12, signed=True)
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 2048, 1, "US"
    return {"expect": "sent", "display": "same"}


def signed_16bit(ds: Dataset, arr: np.ndarray) -> dict:
    """Signed 16 bit with a rescale and a VOI window that spans the data."""
    _as_dx(ds)
    _native(ds, arr.astype(np.int32) * 256 - 32768, bits_stored=16, signed=True)
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 100, "0.5", "US"
    lo, hi = 100 + 0.5 * (-32768), 100 + 0.5 * (255 * 256 - 32768)
    ds.WindowCenter, ds.WindowWidth = f"{(lo + hi) / 2:g}", f"{hi - lo:g}"
    return {"expect": "sent", "display": "same"}


def lateral_view(ds: Dataset, arr: np.ndarray) -> dict:
    ds.ViewPosition = "LL"
    return {"expect": "skipped", "reason": "lateral", "display": None}


def bits_allocated_32(ds: Dataset, arr: np.ndarray) -> dict:
    """32 bits allocated: legal DICOM, not a legal CR/DX/SC grayscale encoding (dead-lettered with the reason)."""
    _native(ds, arr.astype(np.uint32) * 65536, bits_stored=32)
    return {"expect": "dead_lettered", "reason": "BitsAllocated", "display": None}


CASES: dict[str, Callable[[Dataset, np.ndarray], dict]] = {f.__name__: f for f in (
    missing_type2, google_dx_implicit, google_nih_exact, charset_utf8, charset_gb18030, charset_iso2022_jp,
    private_tags, modality_voi_lut_sequences, mono1_presentation_inverse, mono2_presentation_inverse, pixel_padding,
    matrix_tiny, matrix_large, signed_12bit, signed_16bit, lateral_view, bits_allocated_32)}


def make_case(name: str, base: Dataset, arr: np.ndarray) -> tuple[Dataset, dict]:
    """One oddity: a copy of ``base`` with its own UIDs (same patient, new study), changed as ``CASES[name]`` says."""
    ds = copy.deepcopy(base)
    ds.file_meta = FileMetaDataset(copy.deepcopy(base.file_meta))
    ds.StudyInstanceUID = _uid(name, "study", base)
    ds.SeriesInstanceUID = _uid(name, "series", base)
    ds.SOPInstanceUID = _uid(name, "sop", base)
    info = CASES[name](ds, arr)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds, info


def make_corpus(out: Path, source: Path = DEFAULT_SOURCE, names: list[str] | None = None) -> dict[str, dict]:
    """Write every case (or ``names``) into ``out``; returns the manifest (also written as manifest.json)."""
    out.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(source)
    arr = base.pixel_array
    manifest = {}
    for name in names or list(CASES):
        ds, info = make_case(name, base, arr)
        path = out / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        manifest[name] = {"file": str(path), "sop_instance_uid": str(ds.SOPInstanceUID),
                          "sop_class_uid": str(ds.SOPClassUID), "transfer_syntax": str(ds.file_meta.TransferSyntaxUID),
                          **info}
    manifest["_plain"] = {"file": str(source), "sop_instance_uid": str(base.SOPInstanceUID)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    return manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    p.add_argument("--case", action="append", choices=sorted(CASES), help="only these cases")
    args = p.parse_args()
    for name, info in make_corpus(args.out, args.source, args.case).items():
        print(f"{name:28s} {info.get('expect', 'reference'):14s} {info['file']}")


if __name__ == "__main__":
    main()
