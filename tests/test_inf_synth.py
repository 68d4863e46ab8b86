"""Synthetic RSNA-format data: real DICOM like the RSNA files, boxes from the real distribution inside the lungs."""

import csv
import time

import numpy as np
import pydicom
from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage

from triage_node.training import synth
from triage_node.training.data import read_rsna_labels


def test_writes_rsna_like_dicom_and_labels(tmp_path):
    assert synth.main(synth.get_args_parser().parse_args(["--n", "6", "--out", str(tmp_path), "--seed", "3"])) == 0
    labels = read_rsna_labels(tmp_path / "stage_2_train_labels.csv")
    assert len(labels) == 6
    with open(tmp_path / "stage_2_train_labels.csv") as f:
        assert next(csv.reader(f)) == ["patientId", "x", "y", "width", "height", "Target"]
    files = sorted((tmp_path / "images").glob("*.dcm"))
    assert {p.stem for p in files} == set(labels)
    for p in files:
        ds = pydicom.dcmread(p)
        assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit == "1.2.840.10008.1.2.4.50"
        assert ds.SOPClassUID == SecondaryCaptureImageStorage
        assert ds.Modality == "CR" and ds.BodyPartExamined == "CHEST" and ds.ViewPosition in ("PA", "AP")
        assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored) == (1024, 1024, 8, 8)
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.SamplesPerPixel == 1
        assert ds.PatientID == p.stem and ds.StudyInstanceUID
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds["PixelData"].is_undefined_length
        px = ds.pixel_array
        assert px.shape == (1024, 1024) and px.dtype == np.uint8 and px.std() > 10


def test_positive_boxes_inside_lung_fields_and_from_real_stats():
    stats = synth.load_box_stats()
    assert 0.2 < stats["positive_ratio"] < 0.25 and stats["n_boxes"] == 9555
    n_boxes = []
    for i, case in enumerate(synth.generate(12, size=512, seed=11, positive=True)):
        assert case.positive and 1 <= len(case.boxes) <= 4
        n_boxes.append(len(case.boxes))
        for x, y, w, h in case.boxes:
            assert 0 <= x and 0 <= y and x + w <= 512 + 1 and y + h <= 512 + 1
            cy, cx = int(y + h / 2), int(x + w / 2)
            assert case.lung_mask[cy, cx], f"case {i}: box centre outside the lungs"
            assert case.lung_mask[int(y):int(y + h), int(x):int(x + w)].mean() >= 0.45
    assert max(n_boxes) >= 2  # real box sets are mostly pairs


def test_negatives_have_distractors_and_no_boxes():
    cases = list(synth.generate(30, size=256, seed=5, positive=False))
    assert all(len(c.boxes) == 0 for c in cases)
    kinds = {k for c in cases for k in c.distractors}
    assert {"outside_opacity", "wire", "leads"} <= kinds


def test_reproducible_and_fast():
    a = next(synth.generate(1, size=1024, seed=7))
    b = next(synth.generate(1, size=1024, seed=7))
    assert np.array_equal(a.image, b.image)
    t = time.perf_counter()
    list(synth.generate(3, size=1024, seed=8))
    assert (time.perf_counter() - t) / 3 < 0.5
