"""DICOMweb ingest: STOW-RS into the node (dicomweb-client and Orthanc as real STOW clients, auth), and the
QIDO-RS/WADO-RS pull mode restarted mid-way (nothing lost, nothing twice)."""

from __future__ import annotations

import json

import pydicom
import pytest
import redis
import requests
from dicomweb_client.api import DICOMwebClient

from conftest import SAMPLES
from triage_node import config
from triage_node.audit import Audit, read
from triage_node.cli import _submitter
from triage_node.ingest import Ingest
from triage_node.services import free_port
from triage_node.spool import Spool
from triage_node.transport.dicomweb_in import Puller, start_stow

pytestmark = pytest.mark.integration


@pytest.fixture
def gate(tmp_path, redis_url):
    cfg = config.Config(spool=config.SpoolConfig(directory=str(tmp_path / "spool")),
                        broker=config.BrokerConfig(url=redis_url),
                        retry=config.RetryConfig(dead_letter_dir=str(tmp_path / "dead")),
                        audit_log=str(tmp_path / "audit.jsonl"))
    spool = Spool(cfg.spool.directory, cfg.retry.dead_letter_dir)
    return cfg, spool, Ingest(cfg, spool, _submitter(cfg), Audit(cfg.audit_log))


def queued(url: str) -> int:
    return redis.Redis.from_url(url).llen("infer")


def test_stow_rs_into_the_node_with_auth(gate, redis_url):
    cfg, spool, ingest = gate
    srv = start_stow(config.DicomwebIngestConfig(enabled=True, port=0, username="pacs", password="pw"), ingest)
    base = f"http://127.0.0.1:{srv.server_port}"
    try:
        ok = requests.Session()
        ok.auth = ("pacs", "pw")
        client = DICOMwebClient(url=base, session=ok)
        client.set_http_retry_params(retry=False)
        datasets = [pydicom.dcmread(p) for p in SAMPLES[:2]]
        client.store_instances(datasets)
        assert {p.stem for p in spool.pending()} == {str(d.SOPInstanceUID) for d in datasets}
        assert queued(redis_url) == 2
        # wrong password: 401, nothing stored
        bad = DICOMwebClient(url=base, session=requests.Session())
        bad.set_http_retry_params(retry=False)
        with pytest.raises(requests.HTTPError) as err:
            bad.store_instances([pydicom.dcmread(SAMPLES[2])])
        assert err.value.response.status_code == 401 and queued(redis_url) == 2
        # one good, one refused (invalid UID): 202 with the failure reason per instance
        good = pydicom.dcmread(SAMPLES[2])
        broken = pydicom.dcmread(SAMPLES[3])
        broken.SOPInstanceUID = broken.file_meta.MediaStorageSOPInstanceUID = "1.2.3/../x"
        boundary = "XBOUNDARY"
        parts = b""
        for d in (good, broken):
            import io

            buf = io.BytesIO()
            d.save_as(buf, enforce_file_format=True)
            parts += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + buf.getvalue() + b"\r\n"
        parts += f"--{boundary}--\r\n".encode()
        r = ok.post(f"{base}/studies", data=parts, headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
        assert r.status_code == 202
        body = r.json()
        assert body["00081199"]["Value"][0]["00081155"]["Value"] == [str(good.SOPInstanceUID)]
        assert body["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
        assert any(e["event"] == "refused" and e["channel"] == "stow-rs" for e in read(cfg.audit_log))
    finally:
        srv.shutdown()


def test_orthanc_pushes_by_stow_rs(gate, redis_url, orthanc_factory):
    cfg, spool, ingest = gate
    port = free_port()
    srv = start_stow(config.DicomwebIngestConfig(enabled=True, port=port, token="tok"), ingest)
    try:
        from triage_node.localpacs import LocalOrthanc

        pacs = orthanc_factory()
        pacs.stop()
        pacs = LocalOrthanc(pacs.dir.parent / "orthanc-stow", dicomweb_servers={
            "triage": {"Url": f"http://127.0.0.1:{port}/", "HttpHeaders": {"Authorization": "Bearer tok"}}}).start()
        try:
            ids = [pacs.upload(p)["ID"] for p in SAMPLES[:3]]
            r = requests.post(f"{pacs.url}/dicom-web/servers/triage/stow",
                              json={"Resources": ids, "Synchronous": True}, timeout=60)
            assert r.status_code == 200, r.text
        finally:
            pacs.stop()
        assert len(spool.pending()) == 3 and queued(redis_url) == 3
    finally:
        srv.shutdown()


def test_pull_mode_restart_midway_loses_and_duplicates_nothing(gate, redis_url, orthanc_factory, tmp_path):
    cfg, spool, ingest = gate
    pacs = orthanc_factory()
    for p in SAMPLES:
        pacs.upload(p)
    not_cxr = pydicom.dcmread(SAMPLES[0])
    not_cxr.Modality = "MR"
    not_cxr.SOPInstanceUID = not_cxr.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    not_cxr.SeriesInstanceUID = pydicom.uid.generate_uid()
    f = tmp_path / "mr.dcm"
    not_cxr.save_as(f)
    pacs.upload(f)
    pull = config.PullConfig(url=pacs.dicomweb_url, since="19000101", max_per_poll=2, interval_s=0.1)
    state = tmp_path / "pull.sqlite"
    assert Puller(pull, ingest, state).poll_once() == 2
    # the node restarts: a new Puller on the same state file continues where the first stopped
    p2 = Puller(pull, ingest, state)
    total = 2
    while (n := p2.poll_once()):
        total += n
    assert total == len(SAMPLES)
    assert Puller(pull, ingest, state).poll_once() == 0, "nothing fetched twice across restarts"
    assert queued(redis_url) == len(SAMPLES) and len(spool.pending()) == len(SAMPLES)
    received = [e for e in read(cfg.audit_log) if e["event"] == "received"]
    assert sorted(e["sop_instance_uid"] for e in received) == sorted(
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in SAMPLES)
    assert all(e["channel"] == "wado-rs-pull" for e in received)
