"""UID derivation, source cleaning and own-output recognition."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.uid import UID

# tests/ is not a package: pytest puts it on sys.path
from test_enc_common import RSNA, synthetic_xray

from triage_node.encoding import clean_source, derive_uid, is_own_output, model_device_uid

SRC = "1.2.276.0.7230010.3.1.4.8323329.26024.1517874469.23011"
KINDS = ("sr", "sc", "gsps", "sr-series", "sc-series", "gsps-series")


def _valid(uid: str) -> bool:
    return UID(uid).is_valid and len(uid) <= 64 and all(p == "0" or not p.startswith("0") for p in uid.split("."))


def test_derive_uid_deterministic_valid_and_distinct():
    first = {k: derive_uid(SRC, "0.0.1", k) for k in KINDS}
    assert first == {k: derive_uid(SRC, "0.0.1", k) for k in KINDS}
    assert all(_valid(u) for u in first.values())
    assert len(set(first.values())) == len(KINDS)
    other_version = {k: derive_uid(SRC, "0.0.2", k) for k in KINDS}
    assert not set(first.values()) & set(other_version.values())
    assert derive_uid(SRC + "1", "0.0.1", "sr") != first["sr"]


def test_derive_uid_rejects_unknown_kind_and_empty_source():
    with pytest.raises(ValueError):
        derive_uid(SRC, "0.0.1", "seg")
    with pytest.raises(ValueError):
        derive_uid("", "0.0.1", "sr")


def test_model_device_uid_per_trained_model():
    uid = model_device_uid("test-model", "0.0.1")
    assert _valid(uid) and uid == model_device_uid("test-model", "0.0.1")
    assert uid != model_device_uid("test-model", "0.0.2") != model_device_uid("other", "0.0.1")


@pytest.mark.skipif(not RSNA, reason="no RSNA samples in sample_dicom/")
@pytest.mark.parametrize("path", RSNA, ids=lambda p: p.stem[:8])
def test_clean_source_rsna_reports_age_and_spacing(path):
    ds = pydicom.dcmread(path)
    raw_age = ds.PatientAge
    long_spacing = any(len(str(v)) > 16 for v in ds.PixelSpacing)
    cleaned, changed = clean_source(ds)
    assert "PatientAge" in changed
    assert ("PixelSpacing" in changed) == long_spacing
    assert cleaned.PatientAge == f"{int(raw_age):03d}Y"
    assert all(len(str(v)) <= 16 for v in cleaned.PixelSpacing)
    assert abs(float(cleaned.PixelSpacing[0]) - float(ds.PixelSpacing[0])) < 1e-6
    # a copy: the source is untouched, identity and pixels kept
    assert ds.PatientAge == raw_age
    assert cleaned.SOPInstanceUID == ds.SOPInstanceUID and cleaned.StudyInstanceUID == ds.StudyInstanceUID
    assert cleaned.PixelData == ds.PixelData
    # idempotent
    assert clean_source(cleaned)[1] == []


def test_clean_source_generic_by_vr():
    ds = synthetic_xray("dx")
    ds.PatientBirthDate = "1960-01-02"  # repairable DA
    ds.ReferringPhysicianName = "=" * 3 + "A" * 70  # invalid PN component length: blanked (Type 2)
    ds.add_new(0x00081010, "SH", "STATION-NAME-THAT-IS-TOO-LONG")  # StationName SH > 16: dropped
    ds.PatientSize = "1.7500000000000000001"  # long DS: re-encoded
    ds.AccessionNumber = "fine"
    cleaned, changed = clean_source(ds)
    assert set(changed) >= {"PatientAge", "PatientSex", "StudyTime", "InstitutionName", "PixelSpacing",
                            "ImagerPixelSpacing", "PatientBirthDate", "ReferringPhysicianName", "StationName",
                            "PatientSize"}
    assert "AccessionNumber" not in changed and "PatientName" not in changed
    assert cleaned.PatientAge == "063Y" and cleaned.PatientSex == "F" and cleaned.StudyTime == "102233"
    assert cleaned.PatientBirthDate == "19600102"
    assert "InstitutionName" not in cleaned and "StationName" not in cleaned
    assert "ReferringPhysicianName" in cleaned and cleaned.ReferringPhysicianName in ("", None)
    assert float(cleaned.PatientSize) == pytest.approx(1.75)


def test_clean_source_never_invents_patient_data():
    ds = synthetic_xray("cr")
    ds.PatientAge = "about sixty"
    ds.PatientSex = "Female"
    cleaned, changed = clean_source(ds)
    assert "PatientAge" not in cleaned  # Type 3: removed, not guessed
    assert cleaned.PatientSex in ("", None)  # Type 2: emptied, not guessed
    assert {"PatientAge", "PatientSex"} <= set(changed)


@pytest.mark.skipif(not RSNA, reason="no RSNA samples")
def test_clean_source_rsna_sample_set_has_both_defects():
    changed = set()
    for path in RSNA:
        changed |= set(clean_source(pydicom.dcmread(path, stop_before_pixels=True))[1])
    assert {"PatientAge", "PixelSpacing"} <= changed


@pytest.mark.skipif(not RSNA, reason="no RSNA samples")
def test_is_own_output_false_for_sources():
    for path in RSNA:
        assert not is_own_output(pydicom.dcmread(path, stop_before_pixels=True))
    for kind in ("dx", "dx-proc", "cr"):
        assert not is_own_output(synthetic_xray(kind))
