"""The C-STORE receiver on a real loopback association, with a real Redis broker (no worker attached)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pydicom
import pytest
import redis
from conftest import SAMPLES, SPOOL_UNGUARDED, require
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from triage_node import config
from triage_node.audit import Audit, read
from triage_node.cli import _submitter
from triage_node.services import free_port
from triage_node.spool import Spool
from triage_node.transport import scp


@pytest.fixture
def receiver(tmp_path, redis_url):
    """Start the SCP in-process on a free port; yields (cfg, spool, redis client, server)."""
    servers = []

    def start(**kw):
        cfg = config.Config(
            receiver=config.ReceiverConfig(port=free_port(), allowed_calling_aets=("STORESCU", "TESTSCU"),
                                           **kw.pop("receiver", {})),
            spool=config.SpoolConfig(directory=str(tmp_path / "spool"), **{**SPOOL_UNGUARDED, **kw.pop("spool", {})}),
            broker=config.BrokerConfig(url=kw.pop("broker", redis_url)),
            retry=config.RetryConfig(dead_letter_dir=str(tmp_path / "dead")),
            audit_log=str(tmp_path / "audit.jsonl"),
        )
        spool = Spool.from_config(cfg)
        server = scp.start(cfg, spool, _submitter(cfg), Audit(cfg.audit_log), block=False)
        servers.append(server)
        return cfg, spool, server

    yield start
    for s in servers:
        s.shutdown()


def queued(redis_url: str, queue: str = "infer") -> list[dict]:
    r = redis.Redis.from_url(redis_url)
    return [json.loads(m) for m in r.lrange(queue, 0, -1)]


def store(port: int, ds: pydicom.Dataset, calling: str = "TESTSCU", called: str = "TRIAGE") -> int | None:
    ae = AE(ae_title=calling)
    ae.add_requested_context(str(ds.SOPClassUID), [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status) if "Status" in status else None
    finally:
        assoc.release()


def fresh(i: int = 0) -> pydicom.Dataset:
    ds = pydicom.dcmread(SAMPLES[i])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def test_echoscu_and_storescu_as_third_party_peers(receiver, redis_url, tmp_path):
    require("echoscu", "storescu")
    cfg, spool, _ = receiver()
    port = str(cfg.receiver.port)
    echo = subprocess.run(["echoscu", "-aet", "STORESCU", "-aec", "TRIAGE", "127.0.0.1", port], capture_output=True)
    assert echo.returncode == 0, echo.stderr
    st = subprocess.run(["storescu", "-xy", "-aet", "STORESCU", "-aec", "TRIAGE", "127.0.0.1", port,
                         *map(str, SAMPLES[:3])], capture_output=True, text=True)
    assert st.returncode == 0, st.stderr
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in SAMPLES[:3]}
    assert {p.stem for p in spool.pending()} == uids
    tasks = queued(redis_url)
    assert len(tasks) == 3 and {t["headers"]["task"] for t in tasks} == {"triage.analyze"}
    # the spooled bytes are a complete, readable DICOM file with the original pixel data
    for p in spool.pending():
        assert pydicom.dcmread(p).PixelData == pydicom.dcmread(SAMPLES[0].parent / next(
            s.name for s in SAMPLES if pydicom.dcmread(s, stop_before_pixels=True).SOPInstanceUID == p.stem)).PixelData
        assert (p.stat().st_mode & 0o077) == 0, "spool files must be readable by the service user only"


def test_calling_ae_not_allowed_is_rejected(receiver, redis_url):
    require("storescu")
    cfg, spool, _ = receiver()
    st = subprocess.run(["storescu", "-aet", "INTRUDER", "-aec", "TRIAGE", "127.0.0.1", str(cfg.receiver.port),
                         str(SAMPLES[0])], capture_output=True, text=True)
    assert st.returncode != 0
    assert spool.pending() == [] and queued(redis_url) == []
    assert store(cfg.receiver.port, fresh(), calling="INTRUDER") is None
    assert any(e["event"] == "evt_rejected" and e["calling_ae"] == "INTRUDER" for e in read(cfg.audit_log))


def test_wrong_called_ae_is_rejected(receiver):
    cfg, spool, _ = receiver()
    assert store(cfg.receiver.port, fresh(), called="SOMEONE_ELSE") is None


def test_unsupported_sop_class_not_negotiated(receiver):
    cfg, _, _ = receiver()
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", cfg.receiver.port, ae_title="TRIAGE")
    assert assoc.is_established
    accepted = {c.abstract_syntax for c in assoc.accepted_contexts}
    assoc.release()
    assert CTImageStorage not in accepted and Verification in accepted


@pytest.mark.parametrize("bad_uid", ["../../etc/passwd", "1.2.3/../../x", "1.2.03.4", "1.2.3.abc"])
def test_uid_with_path_characters_refused(receiver, tmp_path, bad_uid):
    cfg, spool, _ = receiver()
    ds = fresh()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = bad_uid
    status = store(cfg.receiver.port, ds)
    assert status == scp.CANNOT_UNDERSTAND
    assert spool.pending() == []
    assert not any(tmp_path.rglob("passwd"))
    assert any(e["event"] == "refused" and e["reason"] == "invalid SOP Instance UID" for e in read(cfg.audit_log))


def test_no_pixel_data_refused_with_reason(receiver):
    cfg, spool, _ = receiver()
    ds = fresh()
    del ds.PixelData
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    assert store(cfg.receiver.port, ds) == scp.DATASET_MISMATCH
    assert spool.pending() == []
    assert any(e["event"] == "refused" and e["reason"] == "no pixel data" for e in read(cfg.audit_log))


@pytest.mark.parametrize("change, reason", [
    ({"Modality": "OT"}, "modality OT not processed"),
    ({"BodyPartExamined": "HAND"}, "body part HAND not processed"),
    ({"ViewPosition": "LL"}, "view LL (lateral) not processed"),
    ({"Manufacturer": "CXR Triage Node"}, "own output (written by this node)"),
])
def test_non_cxr_acknowledged_not_processed(receiver, redis_url, change, reason):
    cfg, spool, _ = receiver()
    ds = fresh()
    for k, v in change.items():
        setattr(ds, k, v)
    assert store(cfg.receiver.port, ds) == 0x0000
    assert spool.pending() == [] and queued(redis_url) == []
    skipped = [e for e in read(cfg.audit_log) if e["event"] == "skipped"]
    assert skipped and skipped[-1]["reason"] == reason and skipped[-1]["sop_instance_uid"] == ds.SOPInstanceUID
    # the node keeps serving
    assert store(cfg.receiver.port, fresh(1)) == 0x0000


def test_broker_down_answers_out_of_resources_and_keeps_nothing(receiver):
    cfg, spool, _ = receiver(broker=f"redis://127.0.0.1:{free_port()}/0")
    assert store(cfg.receiver.port, fresh()) == scp.OUT_OF_RESOURCES
    assert spool.pending() == []
    refused = [e for e in read(cfg.audit_log) if e["event"] == "refused"]
    assert refused and refused[-1]["reason"].startswith("broker unavailable")


@pytest.mark.parametrize("limits, reason", [
    ({"max_disk_usage": 0.0}, r"spool disk usage \d+%, at or above the 0% watermark"),
    # a reserve larger than any disk here: the free-space floor alone refuses
    ({"reserve_mb": 2**30}, r"spool free space \d+ MiB, below the 1073741824 MiB reserve"),
], ids=["watermark", "reserve"])
def test_intake_guard_answers_out_of_resources_then_recovers(receiver, redis_url, limits, reason):
    cfg, spool, _ = receiver(spool=limits)
    ds = fresh()
    assert store(cfg.receiver.port, ds) == scp.OUT_OF_RESOURCES
    assert queued(redis_url) == [] and spool.pending() == []
    refused = [e for e in read(cfg.audit_log) if e["event"] == "refused"]
    assert refused and refused[-1]["sop_instance_uid"] == ds.SOPInstanceUID
    assert re.fullmatch(reason, refused[-1]["reason"]), refused[-1]["reason"]
    # the disk is clear again (here: the limits lifted on the running node's spool): accepted, no restart
    spool.max_disk_usage, spool.reserve_bytes = 1.0, 0
    assert store(cfg.receiver.port, ds) == 0x0000
    assert len(spool.pending()) == 1 and len(queued(redis_url)) == 1


def test_same_instance_twice_is_queued_once(receiver, redis_url):
    cfg, spool, _ = receiver()
    ds = fresh()
    assert store(cfg.receiver.port, ds) == 0x0000
    assert store(cfg.receiver.port, ds) == 0x0000
    assert len(spool.pending()) == 1 and len(queued(redis_url)) == 1


def test_receiver_does_not_import_torch():
    code = ("import sys, triage_node.cli, triage_node.transport.scp, triage_node.queue, triage_node.spool;"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("tool, args", [(None, []), ("dcmconv", ["+td"]), ("dcmcjpeg", ["+e1"]), ("dcmcrle", []),
                                        ("j2k", []), ("dcmcjpls", [])])
def test_compressed_transfer_syntaxes_accepted_and_spooled_as_sent(receiver, tmp_path, tool, args):
    """The receiver negotiates each syntax and spools the bytes unchanged (decoding happens in the worker)."""
    cfg, spool, _ = receiver()
    src = fresh(3)
    src.decompress()
    raw = tmp_path / "raw.dcm"
    src.save_as(raw, enforce_file_format=True)
    if tool is None:
        conv = SAMPLES[3]  # JPEG Baseline, as RSNA ships it
    elif tool == "j2k":
        src.compress(pydicom.uid.JPEG2000Lossless)
        conv = tmp_path / "j2k.dcm"
        src.save_as(conv, enforce_file_format=True)
    else:
        require(tool)
        conv = tmp_path / "conv.dcm"
        subprocess.run([tool, *args, str(raw), str(conv)], check=True, capture_output=True)
    ds = pydicom.dcmread(conv)
    assert store(cfg.receiver.port, ds) == 0x0000
    spooled = pydicom.dcmread(spool.instance_path(str(ds.SOPInstanceUID)))
    assert spooled.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert spooled.PixelData == ds.PixelData


def test_many_instances_on_one_association_then_release(receiver, redis_url):
    """Back-to-back C-STOREs are served without returning to pynetdicom's reactor loop between them (scp_server's
    ``_streaming_serve``): every one is answered, spooled and queued once, and the release that follows the stream
    is still seen (the association ends released, not aborted or timed out)."""
    cfg, spool, server = receiver()
    ae = AE(ae_title="TESTSCU")
    ds0 = fresh()
    ae.add_requested_context(str(ds0.SOPClassUID), [str(ds0.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", cfg.receiver.port, ae_title="TRIAGE")
    assert assoc.is_established
    served = server.active_associations[0]._serve_request
    assert served.__qualname__.startswith("_streaming_serve"), "the streaming serve is installed"
    sent = []
    for _ in range(25):
        ds = fresh()
        assert int(assoc.send_c_store(ds).Status) == 0x0000
        sent.append(str(ds.SOPInstanceUID))
    assoc.release()
    assert assoc.is_released and not assoc.is_aborted
    assert sorted(p.stem for p in spool.pending()) == sorted(sent)
    assert len(queued(redis_url)) == 25
    received = [e["sop_instance_uid"] for e in read(cfg.audit_log) if e.get("event") == "received"]
    assert sorted(received) == sorted(sent)
