"""DICOM TLS: a real TLS association with DCMTK storescu (+tls) into the receiver, and our C-STORE SCU into a
TLS-enabled pynetdicom peer; mutual TLS refuses a client without a certificate."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from conftest import SAMPLES, require
from pynetdicom import AE, evt

from triage_node import config
from triage_node.audit import Audit
from triage_node.cli import _submitter
from triage_node.errors import SendFailed
from triage_node.services import free_port
from triage_node.spool import Spool
from triage_node.transport import scp
from triage_node.transport.senders import CStoreSender
from triage_node.transport.tls import server_context


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A throw-away CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    require("openssl")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    for name, san in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "subjectAltName=DNS:client")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(d / f"{name}.key"),
                 "-out", str(d / f"{name}.csr"))
        (d / f"{name}.ext").write_text(san + "\n")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
                 "-CAcreateserial", "-days", "2", "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.pem"))
    return {k: d / v for k, v in {"ca": "ca.pem", "server_cert": "server.pem", "server_key": "server.key",
                                  "client_cert": "client.pem", "client_key": "client.key"}.items()}


@pytest.fixture
def tls_receiver(tmp_path, redis_url, pki):
    cfg = config.Config(
        receiver=config.ReceiverConfig(port=free_port(), allowed_calling_aets=("STORESCU",),
                                       tls_cert=str(pki["server_cert"]), tls_key=str(pki["server_key"]),
                                       tls_ca=str(pki["ca"])),
        spool=config.SpoolConfig(directory=str(tmp_path / "spool")),
        broker=config.BrokerConfig(url=redis_url),
        retry=config.RetryConfig(dead_letter_dir=str(tmp_path / "dead")),
        audit_log=str(tmp_path / "audit.jsonl"),
    )
    spool = Spool(cfg.spool.directory, cfg.retry.dead_letter_dir)
    server = scp.start(cfg, spool, _submitter(cfg), Audit(cfg.audit_log), block=False)
    yield cfg, spool
    server.shutdown()


def test_storescu_over_mutual_tls(tls_receiver, pki):
    require("storescu")
    cfg, spool = tls_receiver
    base = ["storescu", "-xy", "-aet", "STORESCU", "-aec", "TRIAGE", "+cf", str(pki["ca"])]
    ok = subprocess.run([*base, "+tls", str(pki["client_key"]), str(pki["client_cert"]), "127.0.0.1",
                         str(cfg.receiver.port), str(SAMPLES[0])], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    sent_uid = str(pydicom.dcmread(SAMPLES[0], stop_before_pixels=True).SOPInstanceUID)
    assert [p.stem for p in spool.pending()] == [sent_uid]
    # a plain TCP client and a TLS client without a certificate are both refused; nothing is stored
    plain = subprocess.run(["storescu", "-xy", "-aet", "STORESCU", "-aec", "TRIAGE", "127.0.0.1",
                            str(cfg.receiver.port), str(SAMPLES[1])], capture_output=True, text=True, timeout=60)
    anon = subprocess.run([*base, "+tla", "127.0.0.1", str(cfg.receiver.port), str(SAMPLES[1])],
                          capture_output=True, text=True, timeout=60)
    assert plain.returncode != 0 and anon.returncode != 0
    assert len(spool.pending()) == 1


def test_sender_verifies_tls_peer(tmp_path, pki):
    got: list[str] = []

    def on_store(event):
        got.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    peer = AE(ae_title="PACS")
    ds = pydicom.dcmread(SAMPLES[0])
    peer.add_supported_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    port = free_port()
    srv = peer.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)],
                            ssl_context=server_context(config.ReceiverConfig(
                                tls_cert=str(pki["server_cert"]), tls_key=str(pki["server_key"]))))
    try:
        dest = config.Destination(name="pacs-tls", host="127.0.0.1", port=port, ae_title="PACS", tls=True,
                                  tls_ca=str(pki["ca"]), timeout=10)
        assert CStoreSender(dest).send([SAMPLES[0]]) == [str(ds.SOPInstanceUID)]
        assert got == [str(ds.SOPInstanceUID)]
        # without our CA the peer's certificate cannot be verified: refused, nothing sent
        untrusted = config.Destination(name="pacs-tls", host="127.0.0.1", port=port, ae_title="PACS", tls=True,
                                       tls_ca=str(pki["client_cert"]), timeout=10)
        with pytest.raises(SendFailed):
            CStoreSender(untrusted).send([SAMPLES[0]])
        assert len(got) == 1
    finally:
        srv.shutdown()
