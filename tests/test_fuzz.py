"""Hostile input (hypothesis): malformed DICOM for the worker-side functions, malformed C-STOREs and raw PDUs for a
live receiver (in-process SCP, real Redis).

Invariants:
* ``dicom_io.read`` / ``check_eligible`` / ``pixels(max_pixels=...)`` raise only BadDataset / NotEligible, always with
  a message (the reason the worker records); nothing else escapes.
* The receiver answers every C-STORE with a DIMSE status from its documented set and writes exactly one audit line
  (``received`` / ``skipped`` / ``refused``) for it; garbage PDUs never crash or wedge it (a C-ECHO succeeds after
  every batch).
* Memory stays bounded: an oversized image is refused from its header before anything is allocated, and a
  compressed frame whose codestream claims larger dimensions than Rows/Columns ("decompression bomb") is refused
  before decoding.

Cases run and crashes found are written to test-artifacts/reliability/fuzz.json.
"""

from __future__ import annotations

import copy
import io
import json
import resource
import socket
import struct
import subprocess
import sys
import time
import tracemalloc
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import ARTIFACTS, SAMPLES, SPOOL_UNGUARDED
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from triage_node import config, dicom_io
from triage_node.audit import Audit
from triage_node.errors import BadDataset, NotEligible
from triage_node.services import free_port
from triage_node.spool import Spool

CASES: Counter = Counter()
CRASHES: Counter = Counter()
NOTES: Counter = Counter()  # not cases: transient association rejections a real peer would retry
RSS_AT_START: dict[str, float] = {}  # MB resident when the live receiver started
ELIG = config.EligibilityConfig()
MAX_PIXELS = 4_000_000  # well above the fuzz images, far below a bomb
FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", autouse=True)
def _summary():
    t0 = time.time()
    yield
    out = ARTIFACTS / "reliability"
    out.mkdir(parents=True, exist_ok=True)
    (out / "fuzz.json").write_text(json.dumps({
        "suite": "fuzz", "cases": dict(CASES), "total_cases": sum(CASES.values()), "crashes": dict(CRASHES),
        "total_crashes": sum(CRASHES.values()), "notes": dict(NOTES), "seconds": round(time.time() - t0, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "command": ".venv/bin/python -m pytest tests/test_fuzz.py", "ts": time.strftime("%Y-%m-%dT%H:%M:%S")},
        indent=1))


# -- inputs --------------------------------------------------------------------------------------------------------
def small_cxr(rows: int = 48, cols: int = 40) -> Dataset:
    """A tiny, fully eligible uncompressed CR (fixed UIDs: hypothesis needs deterministic inputs)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = dicom_io.CR_IMAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.10.2.1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.2.2", "1.2.826.0.1.3680043.10.2.3"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.PatientName, ds.PatientID = "FUZZ^CASE", "FUZZ1"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(rows * cols, dtype=np.uint16) % 4096).tobytes()
    return ds


def _jpeg_base() -> Dataset:
    return pydicom.dcmread(SAMPLES[0])


BASES = {"small": small_cxr(), "jpeg": _jpeg_base()}
HEADER_TAGS = {  # keyword -> VR
    "Rows": "US", "Columns": "US", "BitsAllocated": "US", "BitsStored": "US", "HighBit": "US",
    "PixelRepresentation": "US", "SamplesPerPixel": "US", "NumberOfFrames": "IS", "PhotometricInterpretation": "CS",
    "Modality": "CS", "BodyPartExamined": "CS", "ViewPosition": "CS", "WindowCenter": "DS", "WindowWidth": "DS",
    "RescaleSlope": "DS", "RescaleIntercept": "DS", "SOPInstanceUID": "UI", "StudyInstanceUID": "UI",
    "SeriesInstanceUID": "UI", "SOPClassUID": "UI", "Manufacturer": "LO", "PlanarConfiguration": "US",
}
BAD_UIDS = ["../../etc/passwd", "1.2.3/../../x", "1.2.03.4", "1.2.3.abc", "", "1.", ".1", "1..2", "1" * 65,
            "1.2.3\\..\\x", "1.2.3\x00", "C:\\windows", "1.2.3 4", "/tmp/x", "~root", "1.2.3" + "\u00e9"]
SYNTAXES = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
            "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
            "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90",
            "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5"]


UID_ROOT = "1.2.826.0.1.3680043.10.1."  # deterministic UIDs: hypothesis replays a case byte for byte


def _uid(draw) -> str:
    return UID_ROOT + str(draw(st.integers(1, 10**12)))


def _value(draw, vr: str):
    if vr == "US":
        return draw(st.one_of(st.sampled_from([0, 1, 7, 8, 12, 15, 16, 17, 24, 32, 64, 65535]),
                              st.integers(0, 65535)))
    if vr in ("IS", "DS"):
        return draw(st.sampled_from(["", "0", "-1", "2", "1", "abc", "1e9", "nan", "inf", "3.5", "-0",
                                     "99999999999", "1\\2", " "]))
    if vr == "UI":
        return draw(st.one_of(st.sampled_from(BAD_UIDS), st.builds(lambda n: f"{UID_ROOT}{n}", st.integers(1, 10**12)),
                              st.sampled_from(list(dicom_io.ACCEPTED_SOP_CLASSES) + ["1.2.840.10008.5.1.4.1.1.2"])))
    return draw(st.one_of(st.sampled_from(["", "MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL_422", "PALETTE COLOR",
                                           "MONOCHROME3", "CR", "DX", "CT", "OT", "CHEST", "HAND", "PA", "AP", "LL",
                                           "LATERAL", "CXR Triage Node"]),
                          st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=20)))


def _mutate_pixels(draw, ds: Dataset) -> None:
    op = draw(st.sampled_from(["truncate", "extend", "empty", "frames", "syntax", "odd"]))
    data = bytes(ds.PixelData)
    encaps = ds.file_meta.TransferSyntaxUID.is_encapsulated
    if op == "truncate":
        ds.PixelData = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif op == "extend":
        ds.PixelData = data + draw(st.binary(min_size=1, max_size=64))
    elif op == "empty":
        ds.PixelData = b""
    elif op == "odd" and not encaps:
        ds.PixelData = data[:-1]
    elif op == "syntax":
        ds.file_meta.TransferSyntaxUID = draw(st.sampled_from(SYNTAXES))
    elif op == "frames":
        frame = next(generate_frames(data, number_of_frames=1)) if encaps else data[:4096]
        kind = draw(st.sampled_from(["no_eoi", "half", "junk", "two_frags", "bad_item", "bad_bot", "zero"]))
        if kind == "no_eoi":
            ds.PixelData = encapsulate([frame.rstrip(b"\x00")[:-2]])
        elif kind == "half":
            ds.PixelData = encapsulate([frame[: len(frame) // 2] + b"\xff\xd9"])
        elif kind == "junk":
            ds.PixelData = encapsulate([draw(st.binary(min_size=2, max_size=512)) + b"\xff\xd9"])
        elif kind == "two_frags":
            ds.PixelData = encapsulate([frame], fragments_per_frame=2)
        elif kind == "bad_item":  # first item tag of the fragment sequence broken
            enc = bytearray(encapsulate([frame]))
            enc[8:12] = b"\xfe\xff\x00\xe1"
            ds.PixelData = bytes(enc)
        elif kind == "bad_bot":  # Basic Offset Table claims more than there is
            enc = bytearray(encapsulate([frame], has_bot=True))
            enc[4:8] = struct.pack("<I", 0xFFFFFFF0)
            ds.PixelData = bytes(enc)
        else:
            ds.PixelData = encapsulate([b"\x00\x00"])
        ds.file_meta.TransferSyntaxUID = draw(st.sampled_from(SYNTAXES[4:])) if not encaps else \
            ds.file_meta.TransferSyntaxUID


@st.composite
def hostile_file(draw) -> bytes:
    """Bytes of a DICOM file derived from an eligible CXR by header, VR, pixel and byte-level corruption."""
    ds = copy.deepcopy(BASES[draw(st.sampled_from(["small", "small", "small", "jpeg"]))])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid(draw)
    for _ in range(draw(st.integers(0, 4))):
        what = draw(st.sampled_from(["typed", "raw_vr", "delete", "pixels", "uid"]))
        key = draw(st.sampled_from(sorted(HEADER_TAGS)))
        tag = pydicom.datadict.tag_for_keyword(key)
        if what == "typed":
            vr, value = HEADER_TAGS[key], _value(draw, HEADER_TAGS[key])
            if vr in ("IS", "DS"):  # invalid number strings: store the bytes, pydicom parses them on read
                b = value.encode() + b" " * (len(value) % 2)
                ds._dict[tag] = RawDataElement(Tag(tag), vr, len(b), b, 0, False, True)
            else:
                ds[tag] = DataElement(tag, vr, value)
        elif what == "raw_vr":  # wrong VR and/or wrong length: the bytes are re-interpreted on read
            value = draw(st.binary(max_size=9))
            vr = draw(st.sampled_from(["UN", "OB", "SS", "FL", "UL", HEADER_TAGS[key]]))
            ds._dict[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
        elif what == "delete" and tag in ds:
            del ds[tag]
        elif what == "pixels" and "PixelData" in ds:
            try:
                _mutate_pixels(draw, ds)
            except Exception:  # pydicom refused to build this corruption (e.g. on an already broken element): skip
                pass
        elif what == "uid":
            b = draw(st.sampled_from(BAD_UIDS)).encode("utf-8")
            b += b"\0" * (len(b) % 2)
            ds._dict[Tag(0x00080018)] = RawDataElement(Tag(0x00080018), "UI", len(b), b, 0, False, True)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # a real Part 10 file: preamble, DICM, file meta (the transfer syntax decides the encoding)
            ds.save_as(buf, enforce_file_format=True)
        except Exception:  # a value pydicom itself refuses to encode: fall back to the raw-bytes cases below
            buf = io.BytesIO()
            BASES["small"].save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    cut = draw(st.sampled_from(["none", "none", "truncate", "flip", "insert", "garbage"]))
    if cut == "truncate":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif cut == "flip":
        raw = bytearray(raw)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(raw) - 1))
            raw[i] ^= draw(st.integers(1, 255))
        raw = bytes(raw)
    elif cut == "insert":
        i = draw(st.integers(0, len(raw)))
        raw = raw[:i] + draw(st.binary(min_size=1, max_size=32)) + raw[i:]
    elif cut == "garbage":
        raw = draw(st.sampled_from([b"", b"DICM", b"\0" * 128 + b"DICM"])) + draw(st.binary(max_size=300))
    return raw


# -- 1. worker-side functions --------------------------------------------------------------------------------------
def worker_side(path: Path) -> str:
    """What the inference task does with a spooled file; returns the outcome ('ok' or the recorded reason)."""
    try:
        ds = dicom_io.read(path)
        dicom_io.check_eligible(ds, ELIG)
        dicom_io.pixels(ds, max_pixels=MAX_PIXELS)
        return "ok"
    except (BadDataset, NotEligible) as exc:
        assert str(exc), "every refusal carries a reason"
        return str(exc)



@settings(FUZZ, max_examples=700)
@given(raw=hostile_file())
def test_worker_functions_only_raise_bad_dataset_or_not_eligible(tmp_path, raw):
    f = tmp_path / "case.dcm"
    f.write_bytes(raw)
    CASES["worker_files"] += 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            worker_side(f)
    except Exception:
        CRASHES["worker_files"] += 1
        raise


def _raw(ds: Dataset, keyword: str, vr: str, value: bytes) -> None:
    tag = Tag(pydicom.datadict.tag_for_keyword(keyword))
    ds._dict[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


def _file_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _header_cases() -> dict[str, bytes]:
    """The minimal reproducers hypothesis found (worker side)."""
    out = {}
    ds = copy.deepcopy(BASES["small"])
    _raw(ds, "NumberOfFrames", "IS", b"abc ")
    out["IS 'abc' in NumberOfFrames"] = _file_bytes(ds)
    raw = bytearray(_file_bytes(BASES["small"]))
    i = raw.find(b"\x28\x00\x02\x00US")  # SamplesPerPixel's explicit VR -> an unknown VR
    raw[i + 4:i + 6] = b"U\x00"
    out["unknown VR in SamplesPerPixel"] = bytes(raw)
    raw = SAMPLES[0].read_bytes()  # JPEG Baseline; one flipped byte makes its syntax UID a non-transfer-syntax
    out["TransferSyntaxUID not a transfer syntax"] = raw.replace(b"1.2.840.10008.1.2.4.50",
                                                                  b"0.2.840.10008.1.2.4.50", 1)
    return out


@pytest.mark.parametrize("case", sorted(_header_cases()))
def test_worker_header_reproducers(tmp_path, case):
    f = tmp_path / "case.dcm"
    f.write_bytes(_header_cases()[case])
    CASES["worker_reproducers"] += 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        worker_side(f)


def test_huge_rows_columns_refused_before_allocation():
    """65535 x 65535 in the header and a few bytes of pixel data: refused from the header, nothing allocated."""
    for rows, cols in ((65535, 65535), (65535, 1024), (8000, 8000)):
        ds = small_cxr()
        ds.Rows, ds.Columns = rows, cols
        tracemalloc.start()
        try:
            with pytest.raises(BadDataset, match="image too large"):
                dicom_io.pixels(ds, max_pixels=MAX_PIXELS)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        CASES["bombs_header"] += 1
        assert peak < 1_000_000, f"{rows}x{cols}: {peak} bytes allocated before refusing"


_BOMB_CHILD = r"""
import json, resource, struct, sys, glob, copy
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # never take the CI machine down
import numpy as np, pydicom
from pydicom.encaps import encapsulate, generate_frames
from pydicom.tag import Tag
from triage_node import dicom_io
from triage_node.errors import BadDataset

def jpeg():
    ds = pydicom.dcmread(sorted(glob.glob(sys.argv[1] + "/*.dcm"))[0])
    return ds, next(generate_frames(ds.PixelData, number_of_frames=1)), b"\xff\xc0", 5

def j2k():
    ds = pydicom.dcmread(sorted(glob.glob(sys.argv[1] + "/*.dcm"))[0])
    ds.decompress()
    ds.Rows = ds.Columns = 256
    ds.PixelData = (np.arange(256 * 256) % 251).astype(np.uint8).tobytes()
    ds.BitsAllocated = ds.BitsStored = 8; ds.HighBit = 7
    ds.compress(pydicom.uid.JPEG2000Lossless)
    return ds, next(generate_frames(ds.PixelData, number_of_frames=1)), b"\xff\x51", 6

results = []
for name, make in (("jpeg_sof", jpeg), ("j2k_siz", j2k)):
    ds, frame, marker, off = make()
    i = frame.find(marker)
    if name == "jpeg_sof":
        bomb = frame[: i + off] + struct.pack(">HH", 16000, 16000) + frame[i + off + 4:]
    else:  # SIZ: Lsiz Rsiz Xsiz Ysiz
        bomb = frame[: i + off] + struct.pack(">II", 16000, 16000) + frame[i + off + 8:]
    ds.PixelData = encapsulate([bomb])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        dicom_io.pixels(ds, max_pixels=4_000_000)
        outcome = "decoded"
    except BadDataset as exc:
        outcome = "BadDataset: " + str(exc)
    except BaseException as exc:
        outcome = "CRASH " + type(exc).__name__
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    results.append({"case": name, "outcome": outcome, "rss_growth_mb": round(grew, 1)})
print(json.dumps(results))
"""


def test_decompression_bomb_refused_before_decoding():
    """A JPEG whose SOF (or a J2K whose SIZ) says 16000 x 16000 inside a 1024 x 1024 header."""
    out = subprocess.run([sys.executable, "-c", _BOMB_CHILD, str(SAMPLES[0].parent)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    CASES["bombs_codestream"] += len(results)
    for r in results:
        assert r["outcome"].startswith("BadDataset"), r
        assert r["rss_growth_mb"] < 100, f"{r['case']}: {r['rss_growth_mb']} MB allocated before refusing"


# -- 2. the live receiver ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live_receiver(tmp_path_factory, redis_server):
    from triage_node.cli import _submitter
    from triage_node.transport import scp

    tmp = tmp_path_factory.mktemp("fuzz-receiver")
    cfg = config.Config(
        receiver=config.ReceiverConfig(port=free_port(), allowed_calling_aets=("TESTSCU",), acse_timeout=5,
                                       dimse_timeout=5, network_timeout=5, max_associations=8),
        spool=config.SpoolConfig(directory=str(tmp / "spool"), **SPOOL_UNGUARDED),
        broker=config.BrokerConfig(url=redis_server.url.replace("/0", "/5")),
        retry=config.RetryConfig(dead_letter_dir=str(tmp / "dead")),
        audit_log=str(tmp / "audit.jsonl"),
    )
    spool = Spool.from_config(cfg)
    server = scp.start(cfg, spool, _submitter(cfg), Audit(cfg.audit_log), block=False)
    RSS_AT_START["receiver"] = _rss_mb()
    yield cfg, spool, server
    server.shutdown()
    import redis

    redis.Redis.from_url(cfg.broker.url).flushdb()


def _rss_mb() -> float:
    return int(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmRSS:"))) / 1024


def _echo(port: int, patience: float = 15.0) -> bool:
    """C-ECHO as a real peer does it: a transient rejection (association slots still held by hostile sessions the
    receiver has not yet timed out, network_timeout = 5 s here) is retried for ``patience`` seconds."""
    from pynetdicom import AE

    ae = AE(ae_title="TESTSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context("1.2.840.10008.1.1")
    deadline = time.time() + patience
    while True:
        assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
        if assoc.is_established:
            try:
                rsp = assoc.send_c_echo()
                return "Status" in rsp and rsp.Status == 0
            finally:
                assoc.release()
        if time.time() > deadline:
            return False
        NOTES["echo_retried"] += 1
        time.sleep(0.5)


class RawStore:
    """One association; sends C-STORE requests whose data set is arbitrary bytes (not re-encoded by pynetdicom)."""

    CLASSES = [*dicom_io.ACCEPTED_SOP_CLASSES, "1.2.840.10008.5.1.4.1.1.2"]

    def __init__(self, port: int) -> None:
        self.port, self.assoc = port, None

    def _connect(self):
        from pynetdicom import AE

        ae = AE(ae_title="TESTSCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        for c in self.CLASSES:
            ae.add_requested_context(c, [ExplicitVRLittleEndian])
        self.assoc = ae.associate("127.0.0.1", self.port, ae_title="TRIAGE")
        assert self.assoc.is_established, "the receiver stopped accepting associations"

    def send(self, sop_class: str, sop_uid: str, payload: bytes) -> int | None:
        from pynetdicom.dimse_primitives import C_STORE

        if self.assoc is None or not self.assoc.is_established:
            self._connect()
        assoc = self.assoc
        ctx = next((c for c in assoc.accepted_contexts if c.abstract_syntax == sop_class), None)
        if ctx is None:  # not negotiated (unsupported class): send on another context, as a confused peer would
            ctx = assoc.accepted_contexts[0]
        req = C_STORE()
        req.MessageID, req.Priority = 1, 2
        req.AffectedSOPClassUID = sop_class
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            req.AffectedSOPInstanceUID = sop_uid
        if not req.AffectedSOPInstanceUID:  # pynetdicom will not put this one on the wire: the data set carries it
            req.AffectedSOPInstanceUID = UID_ROOT + "999"
        req.DataSet = io.BytesIO(payload)
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
        try:
            assoc.dimse.send_msg(req, ctx.context_id)
            _, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        if rsp is None:
            return None
        return int(rsp.Status) if rsp.Status is not None else None

    def close(self):
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()


def _dataset_part(raw: bytes) -> bytes:
    """The data set after the file meta (what a peer puts on the wire), or the raw bytes when there is no meta."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bio = io.BytesIO(raw)
            pydicom.filereader.read_preamble(bio, force=True)
            pydicom.filereader._read_file_meta_info(bio)
            return raw[bio.tell():]
    except Exception:
        return raw


def _new_audit(path: Path, offset: int) -> tuple[list[dict], int]:
    if not path.exists():
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    lines = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    return lines, offset + len(data)


STATUSES = {0x0000, 0xA700, 0xA900, 0xC000, 0x0122}
OUTCOMES = {"received", "skipped", "refused"}


@settings(FUZZ, max_examples=300)
@given(raw=hostile_file(), sop_class=st.sampled_from(RawStore.CLASSES),
       uid=st.one_of(st.just("from-dataset"), st.sampled_from(BAD_UIDS[:6])))
def test_receiver_answers_and_audits_every_hostile_c_store(live_receiver, raw, sop_class, uid):
    cfg, spool, server = live_receiver
    sender = _STATE.setdefault("sender", RawStore(cfg.receiver.port))
    audit_path = Path(cfg.audit_log)
    _, offset = _new_audit(audit_path, _STATE.get("offset", 0))
    body = _dataset_part(raw) or b"\x08\x00\x16\x00"  # an empty data set cannot be put in a P-DATA PDV
    if uid == "from-dataset":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                uid = str(pydicom.dcmread(io.BytesIO(raw), force=True, stop_before_pixels=True).SOPInstanceUID)
        except Exception:
            uid = generate_uid()
        uid = uid if uid and len(uid) <= 64 and uid.isascii() else generate_uid()
    CASES["receiver_c_store"] += 1
    try:
        status = sender.send(sop_class, uid, body)
        lines, offset = _new_audit(audit_path, offset)
        _STATE["offset"] = offset
        outcomes = [rec for rec in lines if rec["event"] in OUTCOMES]
        assert status in STATUSES, f"status {status!r} for a hostile C-STORE"
        assert len(outcomes) == 1, f"exactly one audit outcome per C-STORE, got {outcomes}"
        assert outcomes[0].get("reason") or outcomes[0]["event"] == "received"
    except Exception:
        CRASHES["receiver_c_store"] += 1
        _STATE.pop("sender", None)
        raise
    if CASES["receiver_c_store"] % 50 == 0:
        assert _echo(cfg.receiver.port), "C-ECHO after a batch of hostile C-STOREs"


_STATE: dict = {}


# -- 3. raw PDUs ---------------------------------------------------------------------------------------------------
def _item(t: int, body: bytes) -> bytes:
    return struct.pack(">BxH", t, len(body)) + body


def associate_rq(called: bytes = b"TRIAGE", calling: bytes = b"TESTSCU", max_pdu: int = 16384) -> bytes:
    app = _item(0x10, b"1.2.840.10008.3.1.1.1")
    pcs = b""
    for cid, abstract in ((1, b"1.2.840.10008.1.1"), (3, dicom_io.SECONDARY_CAPTURE.encode())):
        pcs += _item(0x20, bytes([cid, 0, 0, 0]) + _item(0x30, abstract) + _item(0x40, b"1.2.840.10008.1.2.1"))
    user = _item(0x50, _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, b"1.2.3.4"))
    body = struct.pack(">H2x", 1) + called.ljust(16) + calling.ljust(16) + b"\0" * 32 + app + pcs + user
    return struct.pack(">BxI", 1, len(body)) + body


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">IBB", len(data) + 2, context_id, control) + data


def p_data(*pdvs: bytes) -> bytes:
    body = b"".join(pdvs)
    return struct.pack(">BxI", 4, len(body)) + body


def _echo_command() -> bytes:
    from pydicom.filewriter import write_dataset

    cmd = Dataset()
    cmd.AffectedSOPClassUID = "1.2.840.10008.1.1"
    cmd.CommandField, cmd.MessageID, cmd.CommandDataSetType = 0x0030, 1, 0x0101
    buf = pydicom.filebase.DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    write_dataset(buf, cmd)
    body = buf.getvalue()
    group = Dataset()
    group.CommandGroupLength = len(body)
    buf2 = pydicom.filebase.DicomBytesIO()
    buf2.is_little_endian, buf2.is_implicit_VR = True, True
    write_dataset(buf2, group)
    return buf2.getvalue() + body


def _store_command(uid: str) -> bytes:
    from pydicom.filewriter import write_dataset

    cmd = Dataset()
    cmd.AffectedSOPClassUID = dicom_io.SECONDARY_CAPTURE
    cmd.CommandField, cmd.MessageID, cmd.Priority, cmd.CommandDataSetType = 0x0001, 7, 2, 0x0000
    cmd.AffectedSOPInstanceUID = uid
    buf = pydicom.filebase.DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    write_dataset(buf, cmd)
    return buf.getvalue()


def _associated_socket(port: int, read_timeout: float) -> socket.socket:
    """A socket with an accepted association; a transient A-ASSOCIATE-RJ (slots still held by the previous hostile
    sessions, freed when the receiver notices they are gone) is retried for up to 15 s."""
    deadline = time.time() + 15
    while True:
        s = socket.create_connection(("127.0.0.1", port), timeout=read_timeout)
        s.sendall(associate_rq())
        hdr = s.recv(6)
        if hdr[:1] == b"\x02":
            (n,) = struct.unpack(">I", hdr[2:6])
            while n > 0:
                n -= len(s.recv(n))
            return s
        rj = s.recv(4)
        s.close()
        transient = hdr[:1] == b"\x03" and len(rj) == 4 and rj[1] == 2  # result 2: rejected-transient
        assert transient and time.time() < deadline, f"A-ASSOCIATE-AC expected, got {hdr + rj!r}"
        NOTES["raw_pdu_transient_reject"] += 1
        time.sleep(0.3)


def raw_session(port: int, before: bytes | None, after: list[bytes], read_timeout: float = 2.0) -> bytes:
    """Connect, optionally associate, write ``after`` PDUs, half-close; returns what the server answered."""
    s = None
    got = b""
    try:
        if before is not None:
            s = socket.create_connection(("127.0.0.1", port), timeout=read_timeout)
            s.sendall(before)
        else:
            s = _associated_socket(port, read_timeout)
        for chunk in after:
            try:
                s.sendall(chunk)
            except OSError:  # the server aborted and closed: fine
                break
        try:
            s.shutdown(socket.SHUT_WR)
            while len(got) < 1 << 20:
                b = s.recv(65536)
                if not b:
                    break
                got += b
        except OSError:
            pass
    finally:
        if s is not None:
            s.close()
    return got


PDU_CASES = {
    "garbage_pdu_type": lambda d: [struct.pack(">BxI", 0x99, 4) + b"abcd"],
    "dataset_before_command": lambda d: [p_data(pdv(3, 0x02, d.draw(st.binary(max_size=200))))],
    "last_dataset_first": lambda d: [p_data(pdv(3, 0x00, b"\x08\x00\x18\x00" + b"\x00" * 20)),
                                     p_data(pdv(3, 0x03, _store_command(generate_uid())))],
    "command_then_garbage_dataset": lambda d: [p_data(pdv(3, 0x03, _store_command(generate_uid()))),
                                               p_data(pdv(3, 0x02, d.draw(st.binary(max_size=300))))],
    "fragments_out_of_order": lambda d: [p_data(pdv(3, 0x01, _store_command(generate_uid())[20:])),
                                         p_data(pdv(3, 0x03, _store_command(generate_uid())[:20]))],
    "unknown_context_id": lambda d: [p_data(pdv(99, 0x03, _echo_command()))],
    "pdv_longer_than_pdu": lambda d: [struct.pack(">BxI", 4, 10) + struct.pack(">IBB", 5000, 1, 3) + b"\0" * 4],
    "pdv_zero_length": lambda d: [struct.pack(">BxI", 4, 4) + struct.pack(">I", 0)],
    "oversized_declared": lambda d: [struct.pack(">BxI", 4, 0xFFFFFFF0) + b"\0" * 64],
    "oversized_sent": lambda d: [p_data(pdv(3, 0x02, b"\0" * (2 << 20)))],  # 2 MiB > the 256 KiB we accept
    "release_mid_message": lambda d: [p_data(pdv(3, 0x01, _store_command(generate_uid())[:30])),
                                      struct.pack(">BxI", 5, 4) + b"\0" * 4],
    "second_associate_rq": lambda d: [associate_rq()],
    "abort_then_data": lambda d: [struct.pack(">BxIBBBB", 7, 4, 0, 0, 0, 0), p_data(pdv(1, 0x03, _echo_command()))],
    "truncated_header": lambda d: [b"\x04\x00\x00"],
    "random_after_assoc": lambda d: [d.draw(st.binary(min_size=1, max_size=600))],
}


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_raw_pdus_never_crash_or_wedge_the_receiver(live_receiver, data):
    cfg, _, server = live_receiver
    port = cfg.receiver.port
    where = data.draw(st.sampled_from(["before", "after", "after", "after"]))
    CASES["raw_pdu"] += 1
    try:
        if where == "before":  # no association: garbage, a truncated A-ASSOCIATE-RQ, a wrong called AE...
            before = data.draw(st.one_of(st.binary(min_size=1, max_size=400),
                                         st.just(associate_rq()[: data.draw(st.integers(1, 60))]),
                                         st.just(associate_rq(called=b"NOTME")),
                                         st.just(associate_rq(max_pdu=0)),
                                         st.just(struct.pack(">BxI", 1, 0xFFFFFFFF) + b"\0" * 10)))
            raw_session(port, before, [])
        else:
            name = data.draw(st.sampled_from(sorted(PDU_CASES)))
            raw_session(port, None, PDU_CASES[name](data))
        if CASES["raw_pdu"] % 25 == 0:
            assert _echo(port), "C-ECHO after a batch of raw PDUs"
    except AssertionError:
        CRASHES["raw_pdu"] += 1
        raise


def test_receiver_alive_and_bounded_after_fuzzing(live_receiver):
    """Runs after the fuzz tests in this module: the receiver still answers and its threads did not pile up."""
    import threading

    cfg, _, server = live_receiver
    deadline = time.time() + 15
    while time.time() < deadline and len(server.active_associations) > 0:
        time.sleep(0.2)
    assert _echo(cfg.receiver.port)
    hanging = [(a.requestor.ae_title, a.requestor.port, a.dul.state_machine.current_state, a.dul.is_alive())
               for a in server.active_associations]
    # pynetdicom 3.0.4: a hostile command fragment can kill an association's DUL reactor thread (AttributeError
    # CommandField); the Association thread may then linger in Sta1 holding a slot. Seen once in full runs: recorded,
    # tolerated up to one (the receiver still answers), anything else is a wedge.
    leaked = [h for h in hanging if h[2] == "Sta1" and not h[3]]
    NOTES["leaked_association_slots"] += len(leaked)
    assert len(leaked) <= 1 and len(hanging) == len(leaked), f"associations left hanging: {hanging}"
    assert threading.active_count() < 50
    # what the fuzzing added to the resident memory of this process (the receiver runs in it): not its absolute
    # size, which depends on the tests that ran before in the same pytest process (model loads, image synthesis;
    # glibc keeps freed memory), and so on test order
    grown = _rss_mb() - RSS_AT_START["receiver"]
    assert grown < 200, f"resident memory grew by {grown:.0f} MB while fuzzing the receiver"
