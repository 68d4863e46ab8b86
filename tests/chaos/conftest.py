"""Helpers for the fault-injection suite: unique instances, a C-STORE sender that survives its peer dying,
the "nothing lost, nothing duplicated" check against Orthanc + the dead-letter folder, and the JSON summary each
test writes to test-artifacts/reliability/ (``python bench/load.py --summary`` turns them into the docs table)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from conftest import ARTIFACTS, SAMPLES, NodeProcess, node_config
from pydicom.uid import generate_uid
from pynetdicom import AE

from triage_node.services import free_port

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
OURS = "CXR Triage Node"
RELIABILITY = ARTIFACTS / "reliability"
#: small retry settings: a dead PACS is retried a few times within seconds, then dead-lettered
FAST_RETRY = {"max_attempts": 4, "backoff_base_s": 0.3, "backoff_max_s": 1.0}
NO_WEB = {"enabled": False}


def unique(n: int, start: int = 0) -> list[pydicom.Dataset]:
    """``n`` distinct instances: the RSNA samples with new SOP/Study/Series UIDs (one study per instance)."""
    out = []
    for i in range(start, start + n):
        ds = pydicom.dcmread(SAMPLES[i % len(SAMPLES)])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        out.append(ds)
    return out


def store_all(port: int, datasets: list[pydicom.Dataset], statuses: dict[str, int | None] | None = None,
              pause: float = 0.0, calling: str = "TESTSCU") -> dict[str, int | None]:
    """C-STORE each dataset over one association (re-associating after an abort); status None = no answer.

    Never raises: a receiver killed mid-association just leaves the remaining instances unanswered.
    """
    statuses = {} if statuses is None else statuses
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    for sop_class, syntax in {(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}:
        ae.add_requested_context(sop_class, [syntax])
    assoc = None
    for ds in datasets:
        uid = str(ds.SOPInstanceUID)
        try:
            if assoc is None or not assoc.is_established:
                assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
            if not assoc.is_established:
                statuses[uid] = None
                assoc = None
                time.sleep(0.2)
                continue
            rsp = assoc.send_c_store(ds)
            statuses[uid] = int(rsp.Status) if rsp is not None and "Status" in rsp else None
        except Exception:  # the peer vanished mid-PDU
            statuses[uid] = None
            assoc = None
        if pause:
            time.sleep(pause)
    if assoc is not None and assoc.is_established:
        try:
            assoc.release()
        except Exception:
            pass
    return statuses


def echo_ok(port: int, timeout: float = 10.0) -> bool:
    ae = AE(ae_title="TESTSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
    if not assoc.is_established:
        return False
    try:
        rsp = assoc.send_c_echo()
        return rsp is not None and int(rsp.get("Status", -1)) == 0
    finally:
        assoc.release()


def pacs_results(pacs, studies: list[str]) -> dict[str, tuple[int, int]]:
    """study UID -> (our SRs, our SC overlays) held by Orthanc."""
    out = {}
    for st in studies:
        inst = pacs.study_instances(st)
        ours = [i for i in inst if i.get("Manufacturer") == OURS]
        out[st] = (sum(1 for i in ours if i.get("SOPClassUID") == SR_CLASS),
                   sum(1 for i in ours if i.get("SOPClassUID") == SC_CLASS))
    return out


def dead_letters(root: Path) -> dict[str, str]:
    out = {}
    if root.is_dir():
        for d in root.iterdir():
            r = d / "reason.json"
            if r.exists():
                out[d.name] = json.loads(r.read_text()).get("reason", "")
    return out


@dataclass
class Outcome:
    acked: list[str]
    delivered: dict[str, tuple[int, int]]
    dead: dict[str, str]
    stranded: list[str]
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)


def settle(pacs, tmp: Path, acked: dict[str, pydicom.Dataset], timeout: float = 150.0, quiet: float = 3.0) -> Outcome:
    """Wait until every acknowledged instance has its result in the PACS or a dead letter, then let a late duplicate
    land (``quiet`` s) and take the final count. ``acked`` maps SOP Instance UID -> the dataset sent."""
    study = {uid: str(ds.StudyInstanceUID) for uid, ds in acked.items()}
    dl_root = tmp / "dead-letter"
    deadline = time.time() + timeout
    pending = set(acked)
    while pending and time.time() < deadline:
        dead = dead_letters(dl_root)
        res = pacs_results(pacs, [study[u] for u in pending]) if pacs is not None else {}
        pending = {u for u in pending if u not in dead and res.get(study[u], (0, 0)) < (1, 1)}
        if pending:
            time.sleep(1.0)
    time.sleep(quiet)
    dead = dead_letters(dl_root)
    res = pacs_results(pacs, list(study.values())) if pacs is not None else {}
    lost = [u for u in acked if u not in dead and res.get(study[u], (0, 0)) < (1, 1)]
    dup = [u for u in acked if res.get(study[u], (0, 0))[0] > 1 or res.get(study[u], (0, 0))[1] > 1]
    stranded = sorted(p.name for p in (tmp / "spool" / "instances").glob("*") if p.is_file())
    return Outcome(sorted(acked), {u: res.get(study[u], (0, 0)) for u in acked}, dead, stranded, lost, dup)


def wait_idle(tmp: Path, timeout: float = 30.0) -> list[str]:
    """Spool instances/ and outbox/ empty (what is left after ``timeout`` is returned)."""
    deadline = time.time() + timeout
    left: list[str] = []
    while time.time() < deadline:
        left = [p.name for p in (tmp / "spool" / "instances").glob("*")] + \
               [p.name for p in (tmp / "spool" / "outbox").glob("*")]
        if not left:
            return []
        time.sleep(0.5)
    return left


def record(name: str, **fields) -> None:
    """One JSON summary per fault test (read back by ``bench/load.py --summary``)."""
    RELIABILITY.mkdir(parents=True, exist_ok=True)
    fields.setdefault("command", f"TRIAGE_TEST_MODEL=untrained .venv/bin/python -m pytest tests/chaos -k {name}")
    fields["ts"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    (RELIABILITY / f"chaos-{name}.json").write_text(json.dumps({"suite": "chaos", "name": name, **fields}, indent=1))


def kill_group(node: NodeProcess) -> None:
    """Host crash: SIGKILL the node's whole process group (receiver, Celery workers and their children, and the
    private redis-server when ``up`` started one)."""
    try:
        os.killpg(node.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    node.proc.wait(10)
    # the prefork children re-parent to init: wait until nothing of the group is left
    deadline = time.time() + 10
    while time.time() < deadline and group_alive(node.proc.pid):
        try:
            os.killpg(node.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            break
        time.sleep(0.2)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture
def chaos_node(tmp_path):
    """Start (and restart, on the same spool/config) ``triage-node up`` nodes; every one is stopped at teardown."""
    nodes: list[NodeProcess] = []

    def factory(broker_url: str, destinations: list[dict], cfg: dict | None = None, **overrides) -> NodeProcess:
        if cfg is None:
            overrides.setdefault("retry", {})
            overrides["retry"] = {**FAST_RETRY, **overrides["retry"]}
            overrides.setdefault("web", NO_WEB)
            broker_extra = overrides.pop("broker", {})
            cfg = node_config(tmp_path, free_port(), broker_url, destinations, **overrides)
            cfg["broker"].update(broker_extra)
        n = NodeProcess(tmp_path, cfg).start()
        nodes.append(n)
        return n

    yield factory
    for n in nodes:
        n.stop()
        if n.proc is not None and n.proc.poll() is None:
            kill_group(n)
    for n in nodes:  # Celery workers orphaned by a kill -9 of their parent only
        if n.proc is not None and group_alive(n.proc.pid):
            kill_group(n)


@pytest.fixture
def pacs_factory(tmp_path):
    """Orthanc instances, restartable on the same workdir and ports (data survives the restart)."""
    from triage_node.localpacs import LocalOrthanc

    started: list = []

    def factory(name: str = "orthanc", like=None):
        o = (LocalOrthanc(like.dir, http_port=like.http_port, dicom_port=like.dicom_port) if like
             else LocalOrthanc(tmp_path / name))
        o.start()
        started.append(o)
        return o

    yield factory
    for o in started:
        o.stop()


def dicom_dest(pacs, **kw) -> list[dict]:
    return [{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": pacs.dicom_port, "ae_title": "ORTHANC",
             "timeout": 5.0, **kw}]


class Background(threading.Thread):
    """Run ``store_all`` in a thread so a fault can be injected while the association is open."""

    def __init__(self, port: int, datasets: list[pydicom.Dataset], pause: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.port, self.datasets, self.pause = port, datasets, pause
        self.statuses: dict[str, int | None] = {}

    def run(self) -> None:
        store_all(self.port, self.datasets, self.statuses, pause=self.pause)


def pytest_configure(config):
    config.addinivalue_line("markers", "chaos: fault injection on real node processes (tests/chaos)")
