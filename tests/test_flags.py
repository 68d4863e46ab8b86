"""Triage flags: HL7 ORU^R01 to a real MLLP listener (ACK checked, retried), FHIR R4 Bundle and JSON webhook to
real HTTP servers on loopback; and the whole node emitting them after the results reach the PACS."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import hl7
import pydicom
import pytest
from conftest import SAMPLES, c_store

from triage_node import config, pipeline
from triage_node.errors import SendFailed
from triage_node.inference.types import Detection, ModelInfo, Prediction
from triage_node.transport.flags import FhirSender, HL7Sender, ResultContext, WebhookSender


class MLLPListener:
    """A minimal MLLP server: answers each message with an ACK whose MSA-1 comes from ``codes`` (then AA)."""

    def __init__(self, codes: list[str] | None = None) -> None:
        self.codes = list(codes or [])
        self.messages: list[str] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(5)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                buf = b""
                while not buf.endswith(b"\x1c\x0d"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                text = buf.strip(b"\x0b\x1c\x0d").decode()
                self.messages.append(text)
                msg = hl7.parse(text)
                code = self.codes.pop(0) if self.codes else "AA"
                ack = (f"MSH|^~\\&|RIS||CXR-TRIAGE||20260101000000||ACK^R01|A{len(self.messages)}|P|2.5.1\r"
                       f"MSA|{code}|{msg.segment('MSH')[10]}\r")
                conn.sendall(b"\x0b" + ack.encode() + b"\x1c\x0d")

    def close(self) -> None:
        self.sock.close()


class Recorder(BaseHTTPRequestHandler):
    bodies: list[tuple[str, dict, dict]] = []
    status = 201

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append((self.path, dict(self.headers), body))
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture
def http_recorder():
    handler = type("R", (Recorder,), {"bodies": [], "status": 201})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, handler
    server.shutdown()


@pytest.fixture(scope="module")
def context(tmp_path_factory) -> ResultContext:
    out = tmp_path_factory.mktemp("res") / str(pydicom.dcmread(SAMPLES[0], stop_before_pixels=True).SOPInstanceUID)
    pred = Prediction(0.91, 0.5, (Detection(323, 577, 160, 104, 0.8),), ModelInfo("cxr-demo", "0.1.0"), 1024, 1024)
    pipeline.build(SAMPLES[0], pred, config.Config(), out)
    ctx = pipeline.result_context(out)
    assert ctx is not None and ctx.sr_sop_instance_uid
    return ctx


def test_hl7_oru_over_mllp_with_ack(context):
    lis = MLLPListener()
    try:
        dest = config.Destination(name="ris", kind="hl7", host="127.0.0.1", port=lis.port,
                                  sr_link_base="http://pacs/dicom-web")
        ids = HL7Sender(dest).send([], context)
        assert len(ids) == 1 and len(lis.messages) == 1
        msg = hl7.parse(lis.messages[0])
        assert str(msg.segment("MSH")[9]) == "ORU^R01^ORU_R01" and str(msg.segment("MSH")[12]) == "2.5.1"
        assert str(msg.segment("MSH")[10]) == ids[0]
        assert str(msg.segment("PID")[3]) == context.patient_id
        obx = {str(s[3][0][0]): s for s in msg.segments("OBX")}
        assert str(obx["233604007"][5]) == "52101004^Present^SCT"
        assert float(str(obx["PROB"][5])) == pytest.approx(0.91) and str(obx["PROB"][8]) == "A"
        assert "cxr-demo 0.1.0" in str(obx["MODEL"][5])
        assert str(obx["113014"][5]) == context.study_instance_uid
        assert context.sr_sop_instance_uid in str(obx["SR"][5])
    finally:
        lis.close()


def test_hl7_negative_ack_is_retryable_or_final(context):
    lis = MLLPListener(codes=["AE", "AR"])
    try:
        dest = config.Destination(name="ris", kind="hl7", host="127.0.0.1", port=lis.port)
        with pytest.raises(SendFailed) as err:
            HL7Sender(dest).send([], context)
        assert err.value.retryable and "ACK AE" in str(err.value)
        with pytest.raises(SendFailed) as err:
            HL7Sender(dest).send([], context)
        assert not err.value.retryable and "ACK AR" in str(err.value)
        assert HL7Sender(dest).send([], context)  # the third try is acknowledged
    finally:
        lis.close()


def test_negatives_only_when_configured(context):
    lis = MLLPListener()
    try:
        neg = ResultContext(Prediction(0.1, 0.5, (), context.prediction.model), context.study_instance_uid,
                            context.source_sop_instance_uid, context.accession, context.patient_id)
        dest = config.Destination(name="ris", kind="hl7", host="127.0.0.1", port=lis.port)
        assert HL7Sender(dest).send([], neg) == [] and lis.messages == []
        every = config.Destination(name="ris", kind="hl7", host="127.0.0.1", port=lis.port, positives_only=False)
        assert HL7Sender(every).send([], neg)
        obx = {str(s[3][0][0]): s for s in hl7.parse(lis.messages[0]).segments("OBX")}
        assert str(obx["233604007"][5]) == "272519000^Absent^SCT" and str(obx["PROB"][8]) == "N"
    finally:
        lis.close()


def test_fhir_bundle_and_webhook(context, http_recorder):
    server, handler = http_recorder
    base = f"http://127.0.0.1:{server.server_port}"
    FhirSender(config.Destination(name="fhir", kind="fhir", url=f"{base}/fhir", token="t0k",
                                  sr_link_base="http://pacs/dicom-web")).send([], context)
    WebhookSender(config.Destination(name="hook", kind="webhook", url=f"{base}/hook")).send([], context)
    (p1, h1, bundle), (p2, _, hook) = handler.bodies
    assert p1 == "/fhir" and h1["Authorization"] == "Bearer t0k" and h1["Content-Type"] == "application/fhir+json"
    obs, rep = (e["resource"] for e in bundle["entry"])
    assert bundle["type"] == "transaction" and obs["resourceType"] == "Observation"
    assert obs["code"]["coding"][0]["code"] == "233604007" and obs["valueQuantity"]["value"] == pytest.approx(0.91)
    assert obs["interpretation"][0]["coding"][0]["code"] == "POS"
    assert rep["result"][0]["reference"] == bundle["entry"][0]["fullUrl"]
    assert rep["identifier"][0]["value"] == f"urn:oid:{context.study_instance_uid}"
    assert context.sr_sop_instance_uid in rep["presentedForm"][0]["url"]
    assert p2 == "/hook" and hook["flagged"] is True and hook["study_instance_uid"] == context.study_instance_uid
    assert hook["model"] == {"name": "cxr-demo", "version": "0.1.0", "demo": True,
                             "intended_use": "demo model, not for clinical use"}


def test_http_4xx_final_5xx_retryable(context, http_recorder):
    server, handler = http_recorder
    dest = config.Destination(name="hook", kind="webhook", url=f"http://127.0.0.1:{server.server_port}/h")
    for status, retryable in ((422, False), (502, True)):
        handler.status = status
        with pytest.raises(SendFailed) as err:
            WebhookSender(dest).send([], context)
        assert err.value.retryable is retryable


@pytest.mark.integration
def test_node_flags_after_results_reach_the_pacs(tmp_path, redis_url, orthanc_factory, make_node, http_recorder):
    server, handler = http_recorder
    lis = MLLPListener(codes=["AE"])  # the first ACK is an application error: the report task retries
    pacs = orthanc_factory()
    dests = [
        {"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": pacs.dicom_port, "ae_title": "ORTHANC"},
        {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": lis.port, "positives_only": False,
         "sr_link_base": pacs.dicomweb_url},
        {"name": "hook", "kind": "webhook", "url": f"http://127.0.0.1:{server.server_port}/hook",
         "positives_only": False},
    ]
    node = make_node(redis_url, dests)
    try:
        ds = pydicom.dcmread(SAMPLES[1])
        assert c_store(node.port, [ds]) == [0]
        entries = node.wait_audit(lambda es: any(e["event"] == "sent" for e in es), timeout=180)
        sent = next(e for e in entries if e["event"] == "sent")
        assert sent["destinations"] == ["hook", "pacs", "ris"]
        assert [e for e in entries if e["event"] == "retry" and "ACK AE" in e["reason"]]
        assert len(lis.messages) == 2, "retried once after the AE, then acknowledged"
        assert len(handler.bodies) == 1, "a retry resends only to the destinations that failed"
        msg = hl7.parse(lis.messages[-1])
        link = str(next(s for s in msg.segments("OBX") if str(s[3][0][0]) == "SR")[5])
        sr_uid = link.split("/instances/")[1].split("^")[0]
        assert any(i["SOPInstanceUID"] == sr_uid for i in pacs.study_instances(str(ds.StudyInstanceUID)))
    finally:
        lis.close()
