"""The result sender's C-STORE stall: pynetdicom's requestor losing a response to its own reactor loop (the race,
forced deterministically), and a peer that does not answer (resent once on a new association within the
destination's ``dimse_timeout``, logged with UIDs only, recorded for /metrics). Real pynetdicom SCPs on loopback."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, evt

from triage_node.audit import Audit
from triage_node.config import Destination
from triage_node.transport import senders
from triage_node.transport.flags import ResultContext
from triage_node.transport.pool import POOL
from triage_node.transport.scu import guard_of
from triage_node.transport.senders import CStoreSender
from triage_node.web.metrics import NodeCollector
from triage_node.web.state import AuditState

SAMPLE = sorted((Path(__file__).resolve().parent.parent / "sample_dicom").glob("*.dcm"))[0]


@pytest.fixture
def instance(tmp_path) -> Path:
    ds = pydicom.dcmread(SAMPLE)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = tmp_path / "instance.dcm"
    ds.save_as(path)
    return path


@pytest.fixture(autouse=True)
def empty_pool():
    POOL.close_all()
    yield
    POOL.close_all()


class _Scp:
    """A bare pynetdicom Storage SCP; ``withhold`` requests get no response until their association is aborted."""

    def __init__(self, sop_class: str, transfer_syntax: str, withhold: int = 0, refuse_after: bool = False) -> None:
        self.withhold, self.refuse_after = withhold, refuse_after
        self.requests: list[tuple[int, str]] = []  # (id of the association, SOP Instance UID)
        self.stored: dict[str, int] = {}  # SOP Instance UID -> times stored and answered
        self.lock = threading.Lock()
        ae = self.ae = AE(ae_title="PACS")
        ae.add_supported_context(sop_class, [transfer_syntax])
        ae.network_timeout = 60
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port = self.server.socket.getsockname()[1]

    def _on_store(self, event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with self.lock:
            self.requests.append((id(event.assoc), uid))
            withheld = self.withhold > 0
            self.withhold -= withheld
        if withheld:  # the peer that never answers: hold the response until the sender gives the association up
            if self.refuse_after:  # ... and reject every association from now on
                self.ae.require_calling_aet = ["NOBODY"]
            deadline = time.monotonic() + 60
            while event.assoc.is_established and not event.assoc.is_aborted and time.monotonic() < deadline:
                time.sleep(0.01)
            return 0x0000  # goes nowhere: the association is gone
        with self.lock:
            self.stored[uid] = self.stored.get(uid, 0) + 1
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()


def _dest(port: int, **kw) -> Destination:
    return Destination(name="pacs", kind="dicom", host="127.0.0.1", port=port, ae_title="PACS",
                       calling_ae_title="TRIAGE", **kw)


def _wanted(path: Path) -> tuple[tuple[str, str], ...]:
    meta = pydicom.filereader.read_file_meta_info(path)
    return ((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)),)


class _PreemptedAfterWait(threading.Event):
    """Stands in for an association's ``_reactor_checkpoint``. Armed, it plays the scheduler: the association's reactor
    thread, having just passed ``wait()`` with ``_is_paused`` still True, is not run again until the C-STORE response
    has reached the DIMSE queue. The sender then sees the loop "paused" and sends, and it waits for its response only
    after the loop's next ``get_msg(block=False)`` (marked by the loop's next step, ``acse.is_release_requested``)."""

    def __init__(self, assoc) -> None:
        super().__init__()
        self.set()
        self.assoc = assoc
        self.armed, self.passed, self.polled = threading.Event(), threading.Event(), threading.Event()
        self.response_queued = False
        checks = assoc.acse.is_release_requested
        send_msg = assoc.dimse.send_msg

        def is_release_requested() -> bool:  # the reactor's step right after its get_msg
            if self.response_queued:
                self.polled.set()
            return checks()

        def sender_send_msg(primitive, context_id) -> None:
            send_msg(primitive, context_id)
            if self.passed.is_set():  # the sender's get_msg comes after the loop's
                assert self.polled.wait(15), "the reactor loop did not poll the DIMSE queue"

        assoc.acse.is_release_requested = is_release_requested
        assoc.dimse.send_msg = sender_send_msg

    def wait(self, timeout: float | None = None) -> bool:
        passed = super().wait(timeout)
        if passed and threading.current_thread() is self.assoc and self.armed.is_set():
            self.armed.clear()
            self.passed.set()  # preempted here: _is_paused is still True
            deadline = time.monotonic() + 15
            while not self.assoc.dimse.msg_queue.qsize() and time.monotonic() < deadline:
                time.sleep(0.001)
            self.response_queued = True
        return passed


def _send_with_reactor_preempted(assoc, path: Path):
    gate = _PreemptedAfterWait(assoc)
    assoc._reactor_checkpoint = gate
    gate.armed.set()
    assert gate.passed.wait(10), "the reactor loop did not pass its checkpoint"
    status = assoc.send_c_store(path)
    assert gate.response_queued and gate.polled.is_set(), "the interleaving was not forced"
    return status


def test_response_reaches_the_sender_when_its_reactor_loop_was_preempted_after_the_checkpoint(instance):
    """The bad interleaving, forced: without ``scu.guard_responses`` the loop takes the C-STORE-RSP and the sender
    waits its whole DIMSE timeout (see the next test); with it, the sender gets the response."""
    meta = pydicom.filereader.read_file_meta_info(instance)
    scp = _Scp(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
    try:
        assoc = CStoreSender(_dest(scp.port, dimse_timeout=3.0))._associate(_wanted(instance))
        try:
            assert guard_of(assoc) is not None
            status = _send_with_reactor_preempted(assoc, instance)
            assert status and status.Status == 0x0000
            assert assoc.is_established
            # the association goes on as usual after it
            assert assoc.send_c_store(instance).Status == 0x0000
        finally:
            if assoc.is_established:
                assoc.release()
    finally:
        scp.close()
    assert scp.stored == {str(meta.MediaStorageSOPInstanceUID): 2}


def test_stock_pynetdicom_loses_the_response_in_that_interleaving(instance):
    """The race itself, in the pynetdicom this node runs (the reason for ``scu.guard_responses``). If this fails
    after a pynetdicom upgrade, upstream has fixed the pause of the requestor's reactor loop; the guard can go."""
    meta = pydicom.filereader.read_file_meta_info(instance)
    scp = _Scp(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
    try:
        ae = AE(ae_title="TRIAGE")
        ae.add_requested_context(str(meta.MediaStorageSOPClassUID), [str(meta.TransferSyntaxUID)])
        ae.dimse_timeout = 2
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="PACS")
        assert assoc.is_established
        status = _send_with_reactor_preempted(assoc, instance)
        assert not status  # no response: the loop served it as an "unexpected C-STORE service message"
        assert assoc.is_aborted  # and pynetdicom aborted the association after its DIMSE timeout
    finally:
        scp.close()
    # the SCP had stored and answered it
    assert scp.stored == {str(meta.MediaStorageSOPInstanceUID): 1}


def test_a_stalled_cstore_is_resent_once_on_a_new_association_within_the_dimse_timeout(instance, tmp_path, caplog):
    meta = pydicom.filereader.read_file_meta_info(instance)
    uid = str(meta.MediaStorageSOPInstanceUID)
    patient = str(pydicom.dcmread(instance, stop_before_pixels=True).PatientID)
    scp = _Scp(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID), withhold=1)
    audit_path = tmp_path / "audit.jsonl"
    senders.set_audit(Audit(audit_path))
    dimse_timeout = 2.0
    # the sender reads only the identifiers of the result's context (which source image it belongs to)
    source, study = generate_uid(), generate_uid()
    context = ResultContext(None, study, source, "ACC", patient)  # type: ignore[arg-type]
    try:
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="triage_node.transport.senders"):
            sent = CStoreSender(_dest(scp.port, timeout=30.0, dimse_timeout=dimse_timeout)).send([instance], context)
        elapsed = time.monotonic() - t0
    finally:
        senders.set_audit(None)
        scp.close()
    assert sent == [uid]
    assert scp.stored == {uid: 1}  # arrived once (the withheld request was never answered)
    assert [u for _, u in scp.requests] == [uid, uid]
    assert len({a for a, _ in scp.requests}) == 2  # the resend went on a new association
    assert elapsed < dimse_timeout + 15  # not the 30 s connect timeout, nor the task's backoff
    warnings = [r.getMessage() for r in caplog.records if "no C-STORE response" in r.getMessage()]
    assert len(warnings) == 1 and uid in warnings[0] and patient not in warnings[0]
    lines = [json.loads(x) for x in audit_path.read_text().splitlines()]
    assert [x["event"] for x in lines] == ["send_resent"]
    assert lines[0]["sent_uid"] == uid and lines[0]["destination"] == "pacs"
    # the source image and its study are named as in every other per-image event; the result's size too
    assert lines[0]["sop_instance_uid"] == source and lines[0]["study_instance_uid"] == study
    assert lines[0]["bytes"] == Path(instance).stat().st_size and str(lines[0]["bytes"]) in warnings[0]
    assert patient not in audit_path.read_text()
    family = next(f for f in NodeCollector(AuditState(audit_path), probes=None).collect()  # type: ignore[arg-type]
                  if f.name == "triage_send_resent")
    assert family.samples[0].value == 1


def test_a_peer_that_never_answers_fails_into_the_task_retry_after_one_resend(instance, tmp_path):
    meta = pydicom.filereader.read_file_meta_info(instance)
    scp = _Scp(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID), withhold=2)
    senders.set_audit(Audit(tmp_path / "audit.jsonl"))
    try:
        with pytest.raises(senders.SendFailed) as failed:
            CStoreSender(_dest(scp.port, dimse_timeout=1.0)).send([instance])
    finally:
        senders.set_audit(None)
        scp.close()
    assert failed.value.retryable and "within 1 s, twice" in str(failed.value)
    # the reason says what to change when the link, not the peer, is slow
    mb = f"{Path(instance).stat().st_size / 1e6:.1f} MB"
    assert mb in str(failed.value) and "raise dimse_timeout" in str(failed.value)
    assert len(scp.requests) == 2 and not scp.stored


def test_a_refused_reconnect_is_no_resend(instance, tmp_path, caplog):
    """The stall is logged at once, but ``send_resent`` is recorded only once the new association is open: a peer
    that then refuses it fails the send into the task's retry (audited there), with no resend counted."""
    meta = pydicom.filereader.read_file_meta_info(instance)
    scp = _Scp(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID), withhold=1, refuse_after=True)
    audit_path = tmp_path / "audit.jsonl"
    senders.set_audit(Audit(audit_path))
    try:
        with caplog.at_level(logging.WARNING, logger="triage_node.transport.senders"), \
                pytest.raises(senders.SendFailed) as failed:
            CStoreSender(_dest(scp.port, dimse_timeout=1.0)).send([instance])
    finally:
        senders.set_audit(None)
        scp.close()
    assert failed.value.retryable
    assert any("no C-STORE response" in r.getMessage() for r in caplog.records)
    assert not audit_path.exists() or "send_resent" not in audit_path.read_text()
    assert len(scp.requests) == 1 and not scp.stored


def test_timeouts_must_be_positive():
    """0 would make every C-STORE a stall (pynetdicom's queue gives up at once): refused when the config is read."""
    from triage_node import config

    for bad in ({"dimse_timeout": 0}, {"dimse_timeout": -1}, {"timeout": 0}):
        with pytest.raises(ValueError, match="must be > 0"):
            config.Destination(**bad)
    assert config.Destination().dimse_timeout == 10.0
