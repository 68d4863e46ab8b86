"""SR first (``outputs.sr_first``): the report worker sends the SR (and fires the flag channels) before it builds the
overlay, so the finding reaches the PACS without waiting for the image encodes. Real node (`triage-node up`, real
Redis and Celery workers), results C-STOREd to a real pynetdicom Storage SCP on loopback that records the order."""

from __future__ import annotations

import threading
import time

import pydicom
import pytest
from conftest import SAMPLES, c_store, site_point

pytestmark = pytest.mark.integration

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


class RecordingPeer:
    """A Storage SCP recording (SOP class, SOP Instance UID, association id) in arrival order; it answers 0xA700
    (out of resources: retryable) to the first ``refuse_sc`` overlays it is sent."""

    def __init__(self, refuse_sc: int = 0) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.got: list[tuple[str, str, int]] = []
        self.refuse_sc = refuse_sc
        self.lock = threading.Lock()
        ae = AE(ae_title="PEER")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self.on_store)])
        self.port = self.server.socket.getsockname()[1]

    def on_store(self, event) -> int:
        ds = event.dataset
        with self.lock:
            if str(ds.SOPClassUID) == SC_CLASS and self.refuse_sc > 0:
                self.refuse_sc -= 1
                return 0xA700
            self.got.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID), id(event.assoc)))
        return 0x0000

    def wait(self, n: int, timeout: float = 180.0) -> list[tuple[str, str, int]]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self.lock:
                if len(self.got) >= n:
                    return list(self.got)
            time.sleep(0.1)
        raise TimeoutError(f"peer got {self.got}")

    def destination(self) -> list[dict]:
        return [{"name": "peer", "kind": "dicom", "host": "127.0.0.1", "port": self.port, "ae_title": "PEER"}]


@pytest.mark.parametrize("sr_first", [True, False], ids=["sr-first", "one-phase"])
def test_sr_is_sent_before_the_overlay_is_built(tmp_path, redis_url, make_node, sr_first):
    peer = RecordingPeer()
    try:
        node = make_node(redis_url, peer.destination(), outputs={"sr_first": sr_first})
        ds = pydicom.dcmread(SAMPLES[0])
        assert c_store(node.port, [ds]) == [0]
        got = peer.wait(2)
        entries = node.wait_audit(lambda es: any(e["event"] == "sent" for e in es))
    finally:
        peer.server.shutdown()
    time.sleep(0.5)
    assert sorted(c for c, _, _ in peer.got) == sorted([SR_CLASS, SC_CLASS]), "each result exactly once"
    sent = next(e for e in entries if e["event"] == "sent")
    sr_uid = next(u for c, u, _ in got if c == SR_CLASS)
    assert sorted(sent["sent_uids"]) == sorted(u for _, u, _ in got)
    early = [e for e in entries if e["event"] == "sr_sent"]
    if sr_first:
        assert [c for c, _, _ in got] == [SR_CLASS, SC_CLASS], "the SR arrives first"
        assert len(early) == 1 and early[0]["sent_uids"] == [sr_uid], "sr_sent names the SR only"
        assert early[0]["ts"] <= sent["ts"] and early[0]["latency_s"] <= sent["latency_s"]
        # the SR went out before the overlay existed: the first phase's send precedes the overlay's file
        sc_file = next((tmp_path / "results" / str(ds.SOPInstanceUID)).glob("sc-*.dcm"))
        assert early[0]["ts"] <= sc_file.stat().st_mtime + 0.01
    else:
        assert not early
        assert got[0][2] == got[1][2], "one phase: both on one association"


def test_overlay_send_failure_retries_without_sending_the_sr_again(tmp_path, redis_url, make_node):
    """The peer refuses the overlay once (0xA700): the task is retried, the SR (already stored) is not sent again,
    the overlay arrives, and there is one ``sent``."""
    peer = RecordingPeer(refuse_sc=1)
    try:
        node = make_node(redis_url, peer.destination())
        ds = pydicom.dcmread(SAMPLES[1])
        assert c_store(node.port, [ds]) == [0]
        peer.wait(2)
        entries = node.wait_audit(lambda es: any(e["event"] == "sent" for e in es))
        time.sleep(1.0)  # a resent SR would land now
    finally:
        peer.server.shutdown()
    assert sorted(c for c, _, _ in peer.got) == sorted([SR_CLASS, SC_CLASS]), peer.got
    retries = [e for e in entries if e["event"] == "retry"]
    assert len(retries) == 1 and retries[0]["phase"] == "images" and "0xA700" in retries[0]["reason"]
    assert sum(e["event"] == "sr_sent" for e in entries) == 1
    assert sum(e["event"] == "sent" for e in entries) == 1
    assert not list((tmp_path / "spool" / "outbox").iterdir()), "outbox cleaned after delivery"


def test_dashboard_row_shows_sr_sent_then_sent(tmp_path):
    """Ops see the SR-first step: a study whose SR is out but whose overlay is not yet shows 'SR sent' and, when
    positive, is flagged (read first) already; the sr_delivered histogram takes its latency."""
    from triage_node.audit import Audit
    from triage_node.web.state import AuditState

    path = tmp_path / "audit.jsonl"
    audit = Audit(path)
    state = AuditState(path)
    audit.record("received", sop_instance_uid="1.2.3", study_instance_uid="1.2", ms=3.0)
    audit.record("analysed", sop_instance_uid="1.2.3", ms=90.0, probability=0.9, positive=True)
    audit.record("received", sop_instance_uid="1.2.4", study_instance_uid="1.3", ms=3.0)
    audit.record("sr_sent", sop_instance_uid="1.2.3", latency_s=0.21, sent_uids=["1.2.3.9"], positive=True,
                 probability=0.9)
    state.refresh()
    assert state.studies["1.2.3"]["status"] == "SR sent"
    rows = state.recent_studies()
    assert rows[0]["sop_instance_uid"] == "1.2.3" and rows[0]["flagged"], "a positive is flagged once its SR is out"
    assert not rows[1]["flagged"]
    assert state.hist["sr_delivered"].total == 1 and state.hist["end_to_end"].total == 0
    audit.record("sent", sop_instance_uid="1.2.3", latency_s=0.33, positive=True)
    state.refresh()
    assert state.studies["1.2.3"]["status"] == "sent" and state.hist["end_to_end"].total == 1


def test_sc_for_flagged_sends_the_overlay_for_flagged_films_only(tmp_path, redis_url, make_node):
    """``outputs.sc_for = "flagged"``: a film over the threshold gets SR + overlay, a film below it the SR only, with
    nothing left behind (no display cache, no half-built phase); the dashboard's preview exists for the flagged one."""
    peer = RecordingPeer()
    try:
        # a site point at 0.80 between the shipped 0.5.0-demo's scores: 00704310 0.98 (flagged), 00aecb01 0.69 (not)
        node = make_node(redis_url, peer.destination(), outputs={"sc_for": "flagged"},
                         model=site_point(tmp_path, 0.80))
        films = [pydicom.dcmread(p) for p in SAMPLES if p.name.startswith(("00704310", "00aecb01"))]
        assert c_store(node.port, films) == [0, 0]
        entries = node.wait_audit(lambda es: sum(e["event"] == "sent" for e in es) == 2)
        time.sleep(0.5)  # an overlay sent late would land now
    finally:
        peer.server.shutdown()
    sent = {e["sop_instance_uid"]: e for e in entries if e["event"] == "sent"}
    positive = {sop: e["positive"] for sop, e in sent.items()}
    assert sorted(positive.values()) == [False, True], f"expected one flagged and one negative film: {positive}"
    for sop, e in sent.items():
        got = sorted(c for c, u, _ in peer.got if u in e["sent_uids"])
        assert got == sorted([SR_CLASS] + ([SC_CLASS] if positive[sop] else [])), (sop, got)
        archived = tmp_path / "results" / sop
        assert bool(list(archived.glob("sc-*.dcm"))) is positive[sop]
        assert (archived / "preview.png").exists() is positive[sop]
    assert len(peer.got) == 3, peer.got
    assert not list((tmp_path / "spool" / "outbox").iterdir()), "outbox cleaned (no display cache left)"
