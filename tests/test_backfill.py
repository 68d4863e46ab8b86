"""`triage-node backfill` against a real Orthanc (DICOMweb plugin) holding a few hundred instances: a run killed
mid-way and resumed queues every in-range CXR exactly once; a later run finds late arrivals and nothing else.
No workers are attached: what the node would analyse is exactly what sits in the Redis queue."""

from __future__ import annotations

import base64
import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest
import redis
from conftest import SAMPLES, SPOOL_UNGUARDED, require, write_toml
from pydicom.uid import generate_uid

from triage_node.audit import read
from triage_node.backfill import RateLimiter

pytestmark = pytest.mark.integration


def make_instances(out: Path, n_studies: int, per_study: int, date: str, modality: str = "CR",
                   study_uid: str | None = None) -> list[str]:
    """Copies of the shipped samples with new UIDs; returns their SOP Instance UIDs."""
    out.mkdir(parents=True, exist_ok=True)
    sops = []
    for s in range(n_studies):
        study = study_uid or generate_uid()
        series = generate_uid()
        for i in range(per_study):
            ds = pydicom.dcmread(SAMPLES[(s + i) % len(SAMPLES)])
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.StudyDate = study, series, date
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.Modality = modality
            ds.save_as(out / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
            sops.append(str(ds.SOPInstanceUID))
    return sops


def upload(pacs, folder: Path) -> None:
    subprocess.run(["storescu", "-aet", "LOADER", "-aec", "ORTHANC", "+sd", "-xy", "127.0.0.1", str(pacs.dicom_port),
                    str(folder)], check=True, capture_output=True)


def queued(url: str) -> Counter:
    msgs = [json.loads(m) for m in redis.Redis.from_url(url).lrange("infer", 0, -1)]
    return Counter(json.loads(base64.b64decode(m["body"]))[0][0]["sop_instance_uid"] for m in msgs)


def done_count(state: Path) -> int:
    try:
        with sqlite3.connect(state, timeout=1) as db:
            return db.execute("SELECT COUNT(*) FROM done").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_rate_limiter_spaces_requests():
    rl = RateLimiter(50.0)
    t0 = time.monotonic()
    for _ in range(11):
        rl.acquire()
    assert time.monotonic() - t0 >= 10 / 50.0 * 0.99  # ten intervals at least; it can only be slower


def test_backfill_killed_resumed_and_late_arrivals(tmp_path, orthanc_factory, redis_url):
    require("storescu")
    pacs = orthanc_factory()
    in_range = make_instances(tmp_path / "a", 60, 4, "20240110")          # 240 CR instances in the range
    in_range += make_instances(tmp_path / "a", 5, 2, "20240112", "DX")   # 10 DX
    make_instances(tmp_path / "a", 5, 2, "20231231")                     # 10 before the range
    make_instances(tmp_path / "a", 5, 2, "20240111", "OT")               # 10 of another modality
    upload(pacs, tmp_path / "a")
    state = tmp_path / "backfill.sqlite"
    cfg = {"audit_log": str(tmp_path / "audit.jsonl"),
           "spool": {"directory": str(tmp_path / "spool"), **SPOOL_UNGUARDED},
           "broker": {"url": redis_url}, "retry": {"dead_letter_dir": str(tmp_path / "dead")},
           "backfill": {"url": pacs.dicomweb_url, "concurrency": 3, "rate_limit": 100.0, "state": str(state)}}
    config = write_toml(tmp_path / "node.toml", cfg)
    cmd = [sys.executable, "-m", "triage_node.cli", "backfill", "--config", str(config), "--from", "20240101",
           "--to", "20240131", "--no-progress"]

    # run 1, killed (SIGKILL: no clean-up of any kind) once a third is done
    run1 = subprocess.Popen(cmd, stdout=open(tmp_path / "run1.log", "wb"), stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while done_count(state) < 80 and run1.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    run1.send_signal(signal.SIGKILL)
    run1.wait()
    first = done_count(state)
    assert 80 <= first < len(in_range), "the kill did not land mid-run: " + (tmp_path / "run1.log").read_text()[-2000:]

    # run 2 resumes: skips what is done, finishes the rest
    run2 = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run2.returncode == 0, run2.stdout + run2.stderr
    summary = run2.stdout
    assert re.search(r"(\d+) already done", summary) and int(re.search(r"(\d+) already done", summary)[1]) >= first
    q = queued(redis_url)
    assert set(q) == set(in_range), "missed or extra instances"
    assert max(q.values()) == 1, "an instance was queued twice"
    received = Counter(e["sop_instance_uid"] for e in read(cfg["audit_log"])
                       if e["event"] == "received" and e.get("channel") == "backfill")
    assert set(received) == set(in_range) and max(received.values()) == 1
    m = re.search(r"(\d+) DICOMweb requests \(([\d.]+)/s, limit 100/s\)", summary)
    assert m and float(m[2]) <= 100.0 * 1.05, summary  # the archive was never asked faster than the limit

    # late arrivals: 3 instances in a study already done, and a new study dated inside the range
    # (a study inside the range: a late instance dated in the range in an out-of-range study changes what the
    # archive reports as that study's date, which is a different case)
    old_file = next(p for p in sorted((tmp_path / "a").glob("*.dcm")) if p.stem in in_range)
    old_study = str(pydicom.dcmread(old_file, stop_before_pixels=True).StudyInstanceUID)
    late = make_instances(tmp_path / "late", 1, 3, "20240110", study_uid=old_study)
    late += make_instances(tmp_path / "late", 1, 2, "20240105")
    upload(pacs, tmp_path / "late")
    run3 = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run3.returncode == 0, run3.stdout + run3.stderr
    q = queued(redis_url)
    assert set(q) == set(in_range) | set(late) and max(q.values()) == 1
    assert f"received {len(late)}" in run3.stdout, run3.stdout


def test_backfill_recovers_the_audit_line_lost_between_enqueue_and_audit(tmp_path, orthanc_factory, redis_url):
    """A run killed after the enqueue but before its ``received`` line (A), or after that line but before the
    done-set write (B): the next run queues neither again and leaves exactly one ``received`` line for each."""
    require("storescu")
    from triage_node.audit import Audit
    from triage_node.config import load
    from triage_node.enqueue import RedisSubmitter

    pacs = orthanc_factory()
    a, b = make_instances(tmp_path / "a", 1, 2, "20240110")
    upload(pacs, tmp_path / "a")
    cfg = {"audit_log": str(tmp_path / "audit.jsonl"),
           "spool": {"directory": str(tmp_path / "spool"), **SPOOL_UNGUARDED},
           "broker": {"url": redis_url}, "retry": {"dead_letter_dir": str(tmp_path / "dead")},
           "backfill": {"url": pacs.dicomweb_url, "state": str(tmp_path / "backfill.sqlite")}}
    config = write_toml(tmp_path / "node.toml", cfg)
    submit = RedisSubmitter(load(config))
    for sop in (a, b):  # what the interrupted run had done
        submit(str(tmp_path / "spool" / f"{sop}.dcm"), sop, time.time())
    Audit(cfg["audit_log"]).record("received", channel="backfill", sop_instance_uid=b, task_id="t-b")

    run = subprocess.run([sys.executable, "-m", "triage_node.cli", "backfill", "--config", str(config), "--from",
                          "20240101", "--to", "20240131", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "already queued 2" in run.stdout, run.stdout
    assert queued(redis_url) == Counter({a: 1, b: 1})
    received = [e for e in read(cfg["audit_log"]) if e["event"] == "received"]
    assert Counter(e["sop_instance_uid"] for e in received) == Counter({a: 1, b: 1})
    assert [e.get("recovered") for e in received if e["sop_instance_uid"] == a] == [True]


def test_backfill_finds_every_study_when_the_archive_holds_more_than_one_page(tmp_path, orthanc_factory, redis_url):
    """Orthanc answers the second page of a QIDO query that filters on ModalitiesInStudy with nothing: with more
    matching studies than one page, only the first page used to be backfilled. Page size 7 here: a range whose
    first page is full is split by dates; a single day with more than a page of CR studies is paged by date alone."""
    require("storescu")
    pacs = orthanc_factory()
    want = make_instances(tmp_path / "a", 12, 1, "20240103")            # one day, more than a page of CR studies
    make_instances(tmp_path / "a", 3, 1, "20240103", "OT")               # same day, another modality
    for day in range(10, 19):                                            # nine days with one CR study each
        want += make_instances(tmp_path / "a", 1, 2, f"202401{day}")
    want += make_instances(tmp_path / "a", 3, 1, "20240120", "DX")
    make_instances(tmp_path / "a", 2, 1, "20231230")                     # before the range
    upload(pacs, tmp_path / "a")
    cfg = {"audit_log": str(tmp_path / "audit.jsonl"),
           "spool": {"directory": str(tmp_path / "spool"), **SPOOL_UNGUARDED},
           "broker": {"url": redis_url}, "retry": {"dead_letter_dir": str(tmp_path / "dead")},
           "backfill": {"url": pacs.dicomweb_url, "concurrency": 2, "rate_limit": 0.0, "page_size": 7,
                        "state": str(tmp_path / "backfill.sqlite")}}
    config = write_toml(tmp_path / "node.toml", cfg)
    run = subprocess.run([sys.executable, "-m", "triage_node.cli", "backfill", "--config", str(config),
                          "--from", "20240101", "--to", "20240131", "--no-progress"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    q = queued(redis_url)
    assert set(q) == set(want), f"missed {len(set(want) - set(q))}, extra {len(set(q) - set(want))}"
    assert max(q.values()) == 1
