"""encoding.dcmwrite writes byte for byte what pydicom's dcmwrite writes, and takes its fast path for our outputs.

No timing here (bench/e2e_stages.py measures it): each test fails if the fast writer changes a byte of any output.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian

# tests/ is not a package: pytest puts it on sys.path
from test_enc_common import BOXES, RSNA, display_of, prediction, roundtrip, synthetic_xray

from triage_node import dicom_io
from triage_node.encoding import dcmwrite
from triage_node.encoding.results import build_results
from triage_node.encoding.sc import SC_ENCODINGS


def _pydicom_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    copy.deepcopy(ds).save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _fast_bytes(ds: Dataset) -> bytes:
    return dcmwrite._fast(copy.deepcopy(ds))  # raises if it would hand the dataset to pydicom


def _source(kind: str) -> Dataset:
    if kind == "rsna":
        return pydicom.dcmread(RSNA[0])
    if kind == "latin1":  # non-ASCII names and text in ISO_IR 100: pydicom encodes those elements
        ds = synthetic_xray("dx")
        ds.PatientName = "M\u00fcller^J\u00fcrgen"
        ds.StudyDescription = "Thorax p.a. \u00e9tude"
        return roundtrip(ds)
    if kind == "utf8":
        ds = synthetic_xray("dx", monochrome1=True)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "\u5c71\u7530^\u592a\u90ce=\u3084\u307e\u3060^\u305f\u308d\u3046"
        ds.InstitutionName = "H\u00f4pital"
        return roundtrip(ds)
    return synthetic_xray(kind)


@pytest.mark.parametrize("encoding", list(SC_ENCODINGS))
@pytest.mark.parametrize("boxes", [BOXES, ()], ids=["boxes", "nothing-found"])
@pytest.mark.parametrize("kind", ["rsna", "cr", "dx-proc", "latin1", "utf8"])
def test_every_output_is_written_byte_for_byte_as_pydicom_writes_it(kind, boxes, encoding):
    if kind == "rsna" and not RSNA:
        pytest.skip("no RSNA samples")
    src = _source(kind)
    display = display_of(src)
    outputs, _ = build_results(src, display, prediction(boxes=boxes), outputs=("sr", "sc", "gsps"),
                               sc_encoding=encoding)
    assert len(outputs) == 3
    for out in outputs:
        assert _fast_bytes(out) == _pydicom_bytes(out), out.SOPClassUID.name
        assert dcmwrite.encode(copy.deepcopy(out)) == _pydicom_bytes(out)


def test_an_sr_with_a_predecessor_read_from_a_file_is_written_as_pydicom_writes_it():
    src = synthetic_xray("cr")
    first, _ = build_results(src, None, prediction(), outputs=("sr",))
    earlier = roundtrip(first[0])  # as pipeline.previous_sr reads it from the archive
    newer = prediction(model=dataclass_replace_version(prediction().model, "0.0.2"))
    outs, _ = build_results(src, None, newer, outputs=("sr",), predecessor_sr=earlier)
    assert "PredecessorDocumentsSequence" in outs[0]
    assert dcmwrite.encode(copy.deepcopy(outs[0])) == _pydicom_bytes(outs[0])


def dataclass_replace_version(model, version: str):
    import dataclasses

    return dataclasses.replace(model, version=version)


def test_what_the_fast_writer_was_not_made_for_is_written_by_pydicom():
    read = synthetic_xray("cr")  # read from bytes: raw elements, original encoding set
    with pytest.raises(dcmwrite._NotMine):
        dcmwrite._fast(copy.deepcopy(read))
    assert dcmwrite.encode(copy.deepcopy(read)) == _pydicom_bytes(read)
    out, _ = build_results(read, None, prediction(), outputs=("sr",))
    implicit = out[0]
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    with pytest.raises(dcmwrite._NotMine):
        dcmwrite._fast(copy.deepcopy(implicit))
    assert dcmwrite.encode(copy.deepcopy(implicit)) == _pydicom_bytes(implicit)


def test_odd_values_go_through_pydicom_element_by_element():
    """Values the fast path leaves to pydicom's element writer: DS/IS, non-ASCII, numpy numbers, empty and
    undefined-length sequences, items of undefined length, a long text, an odd-length byte string."""
    out, _ = build_results(synthetic_xray("cr"), None, prediction(), outputs=("sr",))
    ds = out[0]
    ds.add_new(0x00181030, "LO", "Prot\u00f6kol")  # Protocol Name, non-ASCII in the default repertoire
    ds.add_new(0x00280030, "DS", ["0.143", "0.1430000000000001"])
    ds.add_new(0x00200013, "IS", 7)
    ds.add_new(0x00281050, "DS", np.float64(40.5))
    ds.add_new(0x00700262, "FL", np.float32(1.5))
    ds.add_new(0x00280011, "US", [512])
    ds.add_new(0x00082111, "ST", "x" * 1023)
    ds.add_new(0x00090010, "LO", "PRIVATE CREATOR")
    ds.add_new(0x00091001, "OB", b"\x01\x02\x03")
    ds.add_new(0x0040A360, "SQ", [])  # an empty sequence
    empty_undefined = ds[0x0040A360]
    empty_undefined.is_undefined_length = True
    item = Dataset()
    item.CodeValue = "1"
    item.is_undefined_length_sequence_item = True
    ds.add_new(0x00081032, "SQ", [item])
    ds[0x00081032].is_undefined_length = True
    assert _fast_bytes(ds) == _pydicom_bytes(ds)


def test_pipeline_build_writes_the_files_pydicom_would(tmp_path):
    if not RSNA:
        pytest.skip("no RSNA samples")
    import dataclasses

    from triage_node import config, pipeline

    cfg = config.Config()
    cfg = dataclasses.replace(cfg, outputs=dataclasses.replace(cfg.outputs, gsps=True, archive_dir=""))
    pred = prediction(boxes=BOXES)
    files = pipeline.build(RSNA[1], pred, cfg, tmp_path)
    assert {f.name.split("-")[0] for f in files} == {"sr", "sc", "gsps"}
    for f in files:
        written = f.read_bytes()
        ds = pydicom.dcmread(io.BytesIO(written))
        again = io.BytesIO()
        ds.save_as(again, enforce_file_format=True)  # read back and written by pydicom: the same bytes
        assert again.getvalue() == written, f.name
    assert dicom_io.read(files[0]).SOPInstanceUID
