"""DICOMweb STOW-RS egress against Orthanc's DICOMweb plugin (basic auth), and the 4xx / 5xx retry contract
against a real HTTP server on loopback."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pydicom
import pytest
from conftest import SAMPLES

from triage_node import config, pipeline
from triage_node.errors import SendFailed
from triage_node.inference.types import Detection, ModelInfo, Prediction
from triage_node.services import free_port
from triage_node.transport.senders import StowSender

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def result_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    pred = Prediction(0.9, 0.5, (Detection(300, 500, 150, 120, 0.8),), ModelInfo("stow-test", "0.0.1"), 1024, 1024)
    return pipeline.build(SAMPLES[0], pred, config.Config(), out)


def test_stow_rs_to_orthanc_with_basic_auth(orthanc_factory, result_files):
    pacs = orthanc_factory(name="orthanc-auth")
    pacs.stop()
    from triage_node.localpacs import LocalOrthanc

    pacs = LocalOrthanc(pacs.dir.parent / "orthanc-users", users={"triage": "s3cret"}).start()
    try:
        dest = config.Destination(name="web", kind="stow", url=pacs.dicomweb_url, username="triage", password="s3cret")
        uids = StowSender(dest).send(result_files)
        assert len(uids) == 2
        study = str(pydicom.dcmread(SAMPLES[0], stop_before_pixels=True).StudyInstanceUID)
        stored = {i["SOPInstanceUID"] for i in pacs.study_instances(study)}
        assert set(uids) <= stored
        # wrong password: 401 is a client error, never retried
        bad = config.Destination(name="web", kind="stow", url=pacs.dicomweb_url, username="triage", password="no")
        with pytest.raises(SendFailed) as err:
            StowSender(bad).send(result_files)
        assert not err.value.retryable and "HTTP 401" in str(err.value)
    finally:
        pacs.stop()


class _Answer(BaseHTTPRequestHandler):
    status = 503
    seen: list[str] = []

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).seen.append(self.headers.get("Authorization", ""))
        self.send_response(self.status)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(b"server says no")

    def log_message(self, *a):
        pass


@pytest.mark.parametrize("status, retryable", [(503, True), (500, True), (400, False), (409, False)])
def test_stow_retry_only_on_5xx(result_files, status, retryable):
    handler = type("H", (_Answer,), {"status": status, "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dest = config.Destination(name="web", kind="stow", url=f"http://127.0.0.1:{server.server_port}/dicom-web",
                                  token="tok123")
        with pytest.raises(SendFailed) as err:
            StowSender(dest).send(result_files)
        assert err.value.retryable is retryable
        assert f"HTTP {status}" in str(err.value) and "server says no" in str(err.value)
        assert handler.seen and handler.seen[0] == "Bearer tok123"
    finally:
        server.shutdown()


def test_stow_connection_refused_is_retryable(result_files):
    dest = config.Destination(name="web", kind="stow", url=f"http://127.0.0.1:{free_port()}/dicom-web")
    with pytest.raises(SendFailed) as err:
        StowSender(dest).send(result_files)
    assert err.value.retryable
