"""No silent failure: a real film that once got stuck, any exception in a task audited with its stage and reason,
bounded retries, dead letters with reason.json, the poison-instance rule in reconcile, and /metrics showing it all.

The reported bug first: an NIH film as Google converted it (Implicit VR LE, Modality DX, Secondary Capture, no
PatientBirthDate / StudyDate / ReferringPhysicianName / AccessionNumber / ViewPosition) made highdicom raise
AttributeError inside ``pipeline.build``; the task let it escape, Celery acknowledged it, the file sat in the spool.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from conftest import c_store, real_data, require

from triage_node import config, pipeline
from triage_node.errors import BadDataset, SendFailed
from triage_node.failures import attempts_allowed, describe, is_transient
from triage_node.services import free_port, wait_port
from triage_node.spool import Spool

sys.path.insert(0, str(Path(__file__).resolve().parent / "oddities"))
from make_corpus import make_corpus

# tests/ is not a package: pytest puts it on sys.path
from test_enc_common import dciodvfy, prediction
from test_web import metrics, total

REPORT_TASK = "triage.report"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    film = real_data("nih", "original", "00000061_012.dcm")
    return make_corpus(tmp_path_factory.mktemp("oddities"), film,
                       ["google_dx_implicit", "google_nih_exact", "missing_type2"])


@pytest.mark.parametrize("case", ["google_dx_implicit", "google_nih_exact", "missing_type2"])
def test_google_converted_nih_film_builds_valid_sr_sc_gsps(corpus, case, tmp_path):
    """The reported bug: ``pipeline.build`` raised AttributeError ('PatientBirthDate') in highdicom."""
    require("dciodvfy")
    cfg = config.Config()
    cfg = replace(cfg, outputs=replace(cfg.outputs, sc=True, gsps=True, archive_dir=""))
    src = corpus[case]["file"]
    ds = pydicom.dcmread(src)
    assert "PatientBirthDate" not in ds and "StudyDate" not in ds and "AccessionNumber" not in ds
    files = pipeline.build(src, prediction(), cfg, tmp_path / "out")
    assert sorted(f.name.split("-")[0] for f in files) == ["gsps", "sc", "sr"]
    for f in files:
        out = pydicom.dcmread(f)
        assert out.StudyInstanceUID == ds.StudyInstanceUID
        # absent Type 2 in the source -> present and empty in ours (unknown), never invented
        for kw in ("PatientBirthDate", "StudyDate", "AccessionNumber", "ReferringPhysicianName", "StudyID"):
            assert kw in out and not out[kw].value, f"{f.name}: {kw}"
        errors, _ = dciodvfy(f)
        assert errors == [], f"{f.name}: {errors}"


def test_describe_gives_type_attribute_and_place_never_values():
    try:
        pydicom.Dataset().PatientBirthDate  # noqa: B018 - the reported failure, raised for real
    except AttributeError as exc:
        text = describe(exc)
    assert text.startswith("AttributeError 'PatientBirthDate' at pydicom/dataset.py:") and "(__getattr__)" in text
    secret = ValueError("'Smith^John' is not a valid PN for 19600102")
    assert "Smith" not in describe(secret) and "1960" not in describe(secret) and describe(secret) == "ValueError"
    assert describe(BadDataset("no pixel data")) == "no pixel data"  # our own reasons are written to be recorded


def test_retry_budget_by_kind_of_failure():
    assert is_transient(OSError(28, "No space left on device")) and attempts_allowed(OSError(), 5) == 5
    assert not is_transient(AttributeError("x")) and attempts_allowed(AttributeError("x"), 5) == 1
    assert attempts_allowed(BadDataset("x"), 5) == 1 and attempts_allowed(KeyError("k"), 5) == 1
    assert attempts_allowed(RuntimeError("?"), 5) == 2, "unknown: one more try, not max_attempts"
    assert attempts_allowed(SendFailed("pacs: refused", retryable=True), 4) == 4
    assert attempts_allowed(SendFailed("pacs: rejected", retryable=False), 4) == 1


def test_spool_counts_attempts_durably_and_names_poison(tmp_path):
    sop = "1.2.826.0.1.3680043.8.498.7001"
    spool = Spool(tmp_path / "spool", tmp_path / "dead")
    spool.store(sop, b"x")
    assert spool.poison(sop, 3) is None
    for _ in range(3):  # a worker killed mid-task three times: started, never finished
        spool.begin(sop, "analyze")
    again = Spool(tmp_path / "spool", tmp_path / "dead")  # a restarted node reads the same counts
    assert "analyze started 3 times without finishing" in (again.poison(sop, 3) or "")
    spool.end(sop, "analyze")
    assert spool.poison(sop, 3) is None, "a task that finishes is not a crash"
    spool.fail(sop, "build", "AttributeError 'PatientBirthDate' at highdicom/sr/sop.py:184 (__init__)")
    spool.fail(sop, "build", "AttributeError 'PatientBirthDate' at highdicom/sr/sop.py:184 (__init__)")
    assert spool.poison(sop, 2) == ("poison instance: failed 2 times, last in build: AttributeError "
                                    "'PatientBirthDate' at highdicom/sr/sop.py:184 (__init__)")
    target = spool.dead_letter(sop, "poison", extra={"stage": "reconcile"})
    info = json.loads((target / "reason.json").read_text())
    assert info["history"]["failures"] == 2 and (target / "source.dcm").exists()
    assert spool.attempts(sop) == {}, "finished instances leave no counter behind"


def test_reconcile_dead_letters_poison_instead_of_re_enqueueing(tmp_path, redis_url):
    import os

    from triage_node.cli import reconcile

    cfg = config.Config()
    cfg = replace(cfg, broker=replace(cfg.broker, url=redis_url), audit_log=str(tmp_path / "audit.jsonl"),
                  retry=replace(cfg.retry, max_attempts=3))
    spool = Spool(tmp_path / "spool", tmp_path / "dead")
    poison, crashed, fine = (f"1.2.826.0.1.3680043.8.498.70{i}" for i in (11, 12, 13))
    for sop in (poison, crashed, fine):
        path, _ = spool.store(sop, b"not read by reconcile")
        os.utime(path, (time.time() - 3600,) * 2)
    for _ in range(3):
        spool.fail(poison, "build", "KeyError 'probability' at triage_node/inference/types.py:80 (from_json)")
        spool.begin(crashed, "report")
    submitted = []
    n = reconcile(cfg, spool, lambda path, sop, t0: submitted.append(sop), older_than_s=60)
    assert n == 1 and submitted == [fine], "poison is never re-enqueued"
    for sop, why in ((poison, "failed 3 times, last in build: KeyError"),
                     (crashed, "report started 3 times without finishing")):
        info = json.loads((tmp_path / "dead" / sop / "reason.json").read_text())
        assert why in info["reason"] and info["stage"] == "reconcile"
        assert not spool.instance_path(sop).exists()
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert {e["sop_instance_uid"] for e in lines if e["event"] == "dead_lettered"} == {poison, crashed}
    assert [e["poisoned"] for e in lines if e["event"] == "reconciled"] == [2]


@pytest.mark.integration
def test_unforeseen_failures_in_a_running_node_are_audited_bounded_and_dead_lettered(tmp_path, redis_url,
                                                                                        make_node, sample_paths):
    """Through `triage-node up` (real Redis, real Celery workers): a report task whose prediction has another
    schema (a mixed-version cluster: KeyError, deterministic) is dead-lettered at once; an outbox that cannot be
    created (OSError, transient) is retried max_attempts (3) times with backoff, then dead-lettered. Both are in
    the audit trail with their stage, in reason.json, and in /metrics and the dashboard's API."""
    web_port = free_port()
    node = make_node(redis_url, [{"name": "out", "kind": "folder", "path": str(tmp_path / "out")}],
                     web={"port": web_port}, model={"path": "untrained"})
    spool = Spool(tmp_path / "spool", tmp_path / "dead-letter")

    # 1. a foreign task message, as a node of another version would enqueue it
    alien = "1.2.826.0.1.3680043.8.498.7101"
    path, _ = spool.store(alien, Path(sample_paths[0]).read_bytes())
    from celery import Celery

    app = Celery("alien", broker=redis_url)
    app.conf.update(task_serializer="json", task_routes={REPORT_TASK: {"queue": "report"}})
    app.send_task(REPORT_TASK, args=[{"path": str(path), "sop_instance_uid": alien, "received_at": time.time(),
                                      "prediction": {"p": 0.9}}])

    # 2. a real C-STORE whose outbox folder is blocked by a file
    ds = pydicom.dcmread(sample_paths[1])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.7102"
    blocked = str(ds.SOPInstanceUID)
    (tmp_path / "spool" / "outbox").mkdir(parents=True, exist_ok=True)
    (tmp_path / "spool" / "outbox" / blocked).write_bytes(b"")
    assert c_store(node.port, [ds]) == [0]

    entries = node.wait_audit(lambda es: {e.get("sop_instance_uid") for e in es if e["event"] == "dead_lettered"}
                              >= {alien, blocked}, timeout=300)
    by = {sop: [e for e in entries if e.get("sop_instance_uid") == sop] for sop in (alien, blocked)}

    failed = [e for e in by[alien] if e["event"] == "failed"]
    assert len(failed) == 1 and failed[0]["stage"] == "build" and not failed[0]["will_retry"]
    assert failed[0]["reason"].startswith("KeyError") and "from_json" in failed[0]["reason"]
    assert not [e for e in by[alien] if e["event"] == "retry"], "a deterministic failure is not retried"

    failed = [e for e in by[blocked] if e["event"] == "failed"]
    retries = [e for e in by[blocked] if e["event"] == "retry"]
    assert [e["failures"] for e in failed] == [1, 2, 3] and len(retries) == 2, "bounded: max_attempts = 3"
    assert all(e["stage"] == "build" and "FileExistsError" in e["reason"] for e in failed + retries)
    assert retries[1]["delay_s"] > retries[0]["delay_s"], "exponential backoff"

    for sop, stage in ((alien, "build"), (blocked, "build")):
        info = json.loads((tmp_path / "dead-letter" / sop / "reason.json").read_text())
        assert info["stage"] == stage and info["reason"].startswith("build: ")
        assert (tmp_path / "dead-letter" / sop / "source.dcm").exists(), "acknowledged data is kept"
        assert not spool.instance_path(sop).exists(), "nothing left for reconcile to re-enqueue"
        assert not (tmp_path / "spool" / "attempts" / f"{sop}.json").exists()

    base = f"http://127.0.0.1:{web_port}/"
    assert wait_port("127.0.0.1", web_port, 30)
    _, m = metrics(base)
    assert total(m, "triage_stage_failures_total", stage="build", event="failed") == 4
    assert total(m, "triage_stage_failures_total", stage="build", event="retry") == 2
    assert total(m, "triage_stage_failures_total", stage="build", event="dead_lettered") == 2
    assert total(m, "triage_dead_letters") == 2
    from test_web import http

    code, body = http(base + "api/overview")
    ov = json.loads(body)
    assert code == 200 and ov["failures_by_stage"]["build"] == {"failed": 4, "retry": 2, "dead_lettered": 2}
    assert {d["sop_instance_uid"]: d["stage"] for d in ov["dead_letters"]} == {alien: "build", blocked: "build"}
