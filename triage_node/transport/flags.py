"""Triage flags for the worklist: HL7 v2.5.1 ORU^R01 over MLLP, FHIR R4 (Observation + DiagnosticReport in a
transaction Bundle) and a JSON webhook. Each is a ``Sender`` like the DICOM ones, so retries, dead letters and
replay work the same way; each skips negatives when ``positives_only``.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..config import Destination
from ..errors import SendFailed
from ..inference.types import Prediction

SCT, LOINC, UCUM = "http://snomed.info/sct", "http://loinc.org", "http://unitsofmeasure.org"
PNEUMONIA = ("233604007", "Pneumonia")
PRESENT, ABSENT = ("52101004", "Present"), ("272519000", "Absent")


@dataclass(frozen=True)
class ResultContext:
    """What a flag says about one analysed image (identifiers go to the RIS, never into logs)."""

    prediction: Prediction
    study_instance_uid: str
    source_sop_instance_uid: str
    accession: str
    patient_id: str
    sr_series_instance_uid: str = ""
    sr_sop_instance_uid: str = ""

    def sr_link(self, base: str) -> str:
        if not (base and self.sr_sop_instance_uid):
            return ""
        return (f"{base.rstrip('/')}/studies/{self.study_instance_uid}/series/{self.sr_series_instance_uid}"
                f"/instances/{self.sr_sop_instance_uid}")


def _esc(value: str) -> str:
    """HL7 v2 escaping of the delimiters."""
    return (value.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\").replace("&", "\\T\\")
            .replace("~", "\\R\\").replace("\r", " ").replace("\n", " "))


def oru_r01(ctx: ResultContext, dest: Destination, control_id: str, sending_app: str = "CXR-TRIAGE") -> str:
    """An ORU^R01 (v2.5.1) with the finding, its probability, the model and a reference to the SR."""
    p = ctx.prediction
    ts = time.strftime("%Y%m%d%H%M%S")
    finding = PRESENT if p.positive else ABSENT
    link = ctx.sr_link(dest.sr_link_base)
    segs = [
        f"MSH|^~\\&|{sending_app}|{_esc(dest.calling_ae_title)}|{_esc(dest.receiving_application)}|"
        f"{_esc(dest.receiving_facility)}|{ts}||ORU^R01^ORU_R01|{control_id}|P|2.5.1",
        f"PID|1||{_esc(ctx.patient_id)}",
        f"OBR|1||{_esc(ctx.accession)}|{PNEUMONIA[0]}^{PNEUMONIA[1]} AI triage^SCT|||{ts}|||||||||||||||{ts}||CR|P",
        f"OBX|1|CWE|{PNEUMONIA[0]}^{PNEUMONIA[1]}^SCT||{finding[0]}^{finding[1]}^SCT||||||P",
        f"OBX|2|NM|PROB^Pneumonia probability^L||{p.probability:.4f}|1^^UCUM||{'A' if p.positive else 'N'}|||P",
        f"OBX|3|NM|BOXES^Opacity regions^L||{len(p.detections)}||||||P",
        f"OBX|4|ST|MODEL^AI model^L||{_esc(p.model.label)}||||||P",
        f"OBX|5|ST|113014^Study Instance UID^DCM||{ctx.study_instance_uid}||||||P",
    ]
    if link:
        segs.append(f"OBX|6|RP|SR^AI structured report^L||{_esc(link)}^^application^dicom||||||P")
    return "\r".join(segs) + "\r"


def _mllp_exchange(host: str, port: int, message: str, timeout: float) -> str:
    frame = b"\x0b" + message.encode("utf-8") + b"\x1c\x0d"
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(frame)
        buf = b""
        while not buf.endswith(b"\x1c\x0d"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return buf.strip(b"\x0b\x1c\x0d").decode("utf-8", "replace")


class HL7Sender:
    name: str

    def __init__(self, dest: Destination) -> None:
        self.name, self.dest = dest.name, dest

    def send(self, files: list[Path], context: ResultContext | None = None) -> list[str]:
        import hl7

        if context is None or (self.dest.positives_only and not context.prediction.positive):
            return []
        control_id = uuid.uuid4().hex[:20]
        msg = oru_r01(context, self.dest, control_id)
        try:
            reply = _mllp_exchange(self.dest.host, self.dest.port, msg, self.dest.timeout)
        except OSError as exc:
            raise SendFailed(f"{self.name}: MLLP {type(exc).__name__}: {exc}") from exc
        try:
            ack = hl7.parse(reply)
            code, ref = str(ack.segment("MSA")[1]), str(ack.segment("MSA")[2])
        except Exception as exc:
            raise SendFailed(f"{self.name}: no valid HL7 ACK ({type(exc).__name__})") from exc
        if ref != control_id:
            raise SendFailed(f"{self.name}: ACK for another message ({ref})")
        if code not in ("AA", "CA"):
            # AE = application error (transient), AR = rejected (will not improve by resending)
            raise SendFailed(f"{self.name}: HL7 ACK {code}", retryable=code in ("AE", "CE"))
        return [control_id]


def _post_json(name: str, url: str, body: dict, dest: Destination, content_type: str) -> None:
    import requests

    headers = {"Content-Type": content_type}
    if dest.token:
        headers["Authorization"] = f"Bearer {dest.token}"
    auth = (dest.username, dest.password) if dest.username else None
    try:
        r = requests.post(url, data=json.dumps(body), headers=headers, auth=auth, timeout=dest.timeout)
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise SendFailed(f"{name}: {type(exc).__name__}") from exc
    if r.status_code >= 300:
        transient = r.status_code >= 500 or r.status_code in (408, 429)
        raise SendFailed(f"{name}: HTTP {r.status_code}: {r.text[:200]}", retryable=transient)


def fhir_bundle(ctx: ResultContext, dest: Destination) -> dict:
    p = ctx.prediction
    obs_id, rep_id = f"urn:uuid:{uuid.uuid4()}", f"urn:uuid:{uuid.uuid4()}"
    study_ident = {"system": "urn:dicom:uid", "value": f"urn:oid:{ctx.study_instance_uid}"}
    subject = {"identifier": {"value": ctx.patient_id}}
    finding = PRESENT if p.positive else ABSENT
    observation = {
        "resourceType": "Observation", "status": "preliminary",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "imaging"}]}],
        "code": {"coding": [{"system": SCT, "code": PNEUMONIA[0], "display": PNEUMONIA[1]}]},
        "subject": subject,
        "valueQuantity": {"value": round(p.probability, 4), "unit": "probability", "system": UCUM, "code": "1"},
        "interpretation": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                                        "code": "POS" if p.positive else "NEG"}]}],
        "component": [{"code": {"text": "opacity regions"}, "valueInteger": len(p.detections)}],
        "device": {"display": p.model.label},
        "note": [{"text": f"AI triage, operating threshold {p.threshold:.3f}; {p.model.intended_use}"}],
    }
    link = ctx.sr_link(dest.sr_link_base)
    report = {
        "resourceType": "DiagnosticReport", "status": "preliminary",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}],
        "code": {"coding": [{"system": SCT, "code": "399208008", "display": "Plain chest X-ray"}]},
        "subject": subject,
        "identifier": [study_ident]
        + ([{"type": {"text": "accession"}, "value": ctx.accession}] if ctx.accession else []),
        "result": [{"reference": obs_id}],
        "conclusion": f"AI triage: pneumonia-like opacity {finding[1].lower()} (p={p.probability:.2f}); "
                      f"{p.model.label}",
        "conclusionCode": [{"coding": [{"system": SCT, "code": finding[0], "display": finding[1]}]}],
    }
    if link:
        report["presentedForm"] = [{"contentType": "application/dicom", "url": link, "title": "AI TID 1500 SR"}]
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": obs_id, "resource": observation, "request": {"method": "POST", "url": "Observation"}},
        {"fullUrl": rep_id, "resource": report, "request": {"method": "POST", "url": "DiagnosticReport"}},
    ]}


def webhook_body(ctx: ResultContext, dest: Destination) -> dict:
    p = ctx.prediction
    return {
        "event": "cxr-triage-result", "flagged": p.positive, "probability": round(p.probability, 4),
        "threshold": p.threshold, "boxes": len(p.detections),
        "study_instance_uid": ctx.study_instance_uid, "sop_instance_uid": ctx.source_sop_instance_uid,
        "accession_number": ctx.accession, "sr_url": ctx.sr_link(dest.sr_link_base),
        "model": {"name": p.model.name, "version": p.model.version, "demo": p.model.demo,
                  "intended_use": p.model.intended_use},
    }


class HttpFlagSender:
    """FHIR or webhook flag: one JSON POST built by ``body`` from the result context."""

    def __init__(self, dest: Destination, body, content_type: str) -> None:
        self.name, self.dest, self.body, self.content_type = dest.name, dest, body, content_type

    def send(self, files: list[Path], context: ResultContext | None = None) -> list[str]:
        if context is None or (self.dest.positives_only and not context.prediction.positive):
            return []
        _post_json(self.name, self.dest.url, self.body(context, self.dest), self.dest, self.content_type)
        return [context.source_sop_instance_uid]


def FhirSender(dest: Destination) -> HttpFlagSender:
    return HttpFlagSender(dest, fhir_bundle, "application/fhir+json")


def WebhookSender(dest: Destination) -> HttpFlagSender:
    return HttpFlagSender(dest, webhook_body, "application/json")
