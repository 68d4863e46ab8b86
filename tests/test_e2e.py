"""End to end on real wires: Orthanc routes CXRs to `triage-node up` (real Redis, real Celery worker processes);
SR + SC come back into the same study in Orthanc."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pydicom
import pytest
from conftest import ARTIFACTS, ROOT, SAMPLES, c_store, require
from pydicom.uid import generate_uid

from triage_node.services import free_port

pytestmark = pytest.mark.integration

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def has_results(instances, n_sources: int = 1) -> bool:
    classes = [i.get("SOPClassUID") for i in instances]
    return classes.count(SR_CLASS) >= n_sources and sum(
        1 for i in instances if i.get("Manufacturer") == "CXR Triage Node" and i.get("SOPClassUID") == SC_CLASS
    ) >= n_sources


def dciodvfy_errors(data: bytes, tmp_path, name: str) -> list[str]:
    f = tmp_path / name
    f.write_bytes(data)
    out = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_orthanc_routes_cxr_and_gets_sr_and_overlay_back(tmp_path, redis_url, orthanc_factory, make_node):
    require("Orthanc", "dciodvfy", "dsrdump")
    port = free_port()
    pacs = orthanc_factory(modalities={"triage": ("TRIAGE", "127.0.0.1", port)})
    node_cfg_dest = [{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": pacs.dicom_port,
                      "ae_title": "ORTHANC", "calling_ae_title": "TRIAGE"}]
    node = make_node(redis_url, node_cfg_dest, receiver={"port": port})
    ids, studies = [], []
    for p in SAMPLES[:3]:
        ids.append(pacs.upload(p)["ID"])
        studies.append(str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID))
    t0 = time.time()
    pacs.route("triage", ids)  # as a PACS auto-routing rule does
    for study in studies:
        instances = pacs.wait_for(study, has_results, timeout=240)
        ours = [i for i in instances if i.get("Manufacturer") == "CXR Triage Node"]
        assert len(ours) == 2, "exactly one SR and one SC per source, in the source study"
        series = {i["SeriesInstanceUID"] for i in instances}
        assert len(series) == 3, "source, SR and SC each in their own series"
        for inst in ours:
            data = pacs.instance_file(inst["_id"])
            errors = dciodvfy_errors(data, tmp_path, f"{inst['SOPInstanceUID']}.dcm")
            assert errors == [], errors
            ds = pydicom.dcmread(io.BytesIO(data))
            assert ds.StudyInstanceUID == study and ds.PatientID
            if ds.SOPClassUID == SR_CLASS:
                f = tmp_path / "sr.dcm"
                f.write_bytes(data)
                dump = subprocess.run(["dsrdump", str(f)], capture_output=True, text=True)
                assert dump.returncode == 0 and "Imaging Measurement Report" in dump.stdout
            else:
                assert ds.BurnedInAnnotation == "YES"
    elapsed = time.time() - t0
    entries = node.audit()
    sent = [e for e in entries if e["event"] == "sent"]
    assert len(sent) == 3 and all(e["latency_s"] < 240 for e in sent)
    # no patient demographics anywhere in what the node logged or audited (UIDs and reasons only)
    logs = [node.tmp / "node.log", node.tmp / "audit.jsonl", *sorted((node.tmp / "log").glob("*.log"))]
    text = "\n".join(p.read_text(errors="replace") for p in logs if p.exists())
    assert "analysed" in text and len(text) > 1000
    # each worker warmed up before its first task (workers/warmup.py): the model in the inference worker's child
    for queue in ("infer", "report"):
        assert f"warmed up for {queue}" in (node.tmp / "log" / f"worker-{queue}.log").read_text(), queue
    for p in SAMPLES[:3]:
        src = pydicom.dcmread(p, stop_before_pixels=True)
        for key in ("PatientName", "PatientID", "PatientBirthDate"):
            value = str(src.get(key, "") or "")
            if len(value) >= 4:
                assert value not in text, f"{key} of an input leaked into the logs"
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "e2e_latency.txt").write_text(f"3 CXRs routed, all results in Orthanc after {elapsed:.1f} s\n")


def test_bad_instance_recorded_and_node_keeps_serving(tmp_path, redis_url, orthanc_factory, make_node):
    pacs = orthanc_factory()
    dest = [{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": pacs.dicom_port, "ae_title": "ORTHANC"}]
    node = make_node(redis_url, dest)
    bad = pydicom.dcmread(SAMPLES[0])
    bad.SOPInstanceUID = bad.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    bad.StudyInstanceUID = generate_uid()
    bad.PixelData = bad.PixelData[: len(bad.PixelData) // 3]  # truncated JPEG stream
    good = pydicom.dcmread(SAMPLES[1])
    good.SOPInstanceUID = good.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    assert c_store(node.port, [bad, good]) == [0, 0]  # acknowledged: the receiver never decodes pixels
    entries = node.wait_audit(lambda es: any(e["event"] == "failed" for e in es)
                              and any(e["event"] == "sent" for e in es), timeout=90)
    failed = [e for e in entries if e["event"] == "failed"]
    assert failed[0]["sop_instance_uid"] == bad.SOPInstanceUID
    assert "pixel data cannot be decoded" in failed[0]["reason"]
    dead = tmp_path / "dead-letter" / bad.SOPInstanceUID / "reason.json"
    assert dead.exists() and "bad dataset" in dead.read_text()
    assert (tmp_path / "dead-letter" / bad.SOPInstanceUID / "source.dcm").exists(), "acknowledged data is kept"
    pacs.wait_for(str(good.StudyInstanceUID), has_results, timeout=120)


def test_unreachable_pacs_dead_letters_then_replay_delivers(tmp_path, redis_url, orthanc_factory, make_node):
    closed = free_port()
    dest = [{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": closed, "ae_title": "ORTHANC",
             "timeout": 3.0}]
    node = make_node(redis_url, dest)
    ds = pydicom.dcmread(SAMPLES[2])
    assert c_store(node.port, [ds]) == [0]
    entries = node.wait_audit(lambda es: any(e["event"] == "dead_lettered" for e in es), timeout=240)
    retries = [e for e in entries if e["event"] == "retry"]
    assert len(retries) == 2, "max_attempts=3: two retries with backoff, then the dead letter"
    assert retries[1]["delay_s"] > retries[0]["delay_s"], "exponential backoff"
    dl = tmp_path / "dead-letter" / str(ds.SOPInstanceUID)
    assert (dl / "reason.json").exists() and "unreachable" in (dl / "reason.json").read_text()
    assert not list((tmp_path / "spool" / "instances").glob("*.dcm")), "nothing stranded in the spool"
    # the PACS comes back: replay from the dead-letter folder
    pacs = orthanc_factory()
    text = node.config_path.read_text().replace(f"port = {closed}", f"port = {pacs.dicom_port}")
    node.config_path.write_text(text)
    out = subprocess.run([sys.executable, "-m", "triage_node.cli", "replay", "--config", str(node.config_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not dl.exists()
    pacs.wait_for(str(ds.StudyInstanceUID), has_results, timeout=60)


def test_worker_killed_mid_task_result_arrives_once(tmp_path, redis_url, orthanc_factory, make_node):
    pacs = orthanc_factory()
    dest = [{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": pacs.dicom_port, "ae_title": "ORTHANC"}]
    node = make_node(redis_url, dest)
    ds = pydicom.dcmread(SAMPLES[0])
    assert c_store(node.port, [ds]) == [0]
    started = node.wait_audit(lambda es: any(e["event"] == "analyze_started" for e in es), timeout=120)
    victim = next(e for e in started if e["event"] == "analyze_started")["pid"]
    os.kill(victim, signal.SIGKILL)  # the inference process dies mid-task
    instances = pacs.wait_for(str(ds.StudyInstanceUID), has_results, timeout=240)
    time.sleep(3)  # a duplicate delivery would land now
    instances = pacs.study_instances(str(ds.StudyInstanceUID))
    ours = [i for i in instances if i.get("Manufacturer") == "CXR Triage Node"]
    assert len(ours) == 2
    entries = node.audit()
    assert sum(1 for e in entries if e["event"] == "analyze_started") >= 2, "the task was delivered again"
    assert sum(1 for e in entries if e["event"] == "sent") == 1


def unique_copies(n: int) -> list[pydicom.Dataset]:
    """``n`` copies of the shipped samples, each with its own SOP Instance UID."""
    batch = []
    for i in range(n):
        ds = pydicom.dcmread(SAMPLES[i % len(SAMPLES)])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        batch.append(ds)
    return batch


def test_several_inference_processes_share_the_queue(tmp_path, redis_url, orthanc_factory, make_node):
    """model.processes = 2: two prefork children with the model each take tasks; outputs.report_processes = 2:
    two report workers (with 2 threads each) each send results; every instance one result."""
    pacs = orthanc_factory()
    dest = [{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": pacs.dicom_port, "ae_title": "ORTHANC"}]
    node = make_node(redis_url, dest, model={"processes": 2},
                     outputs={"report_processes": 2, "report_threads": 2})
    batch = unique_copies(10)
    assert c_store(node.port, batch) == [0] * 10
    entries = node.wait_audit(lambda es: sum(e["event"] == "sent" for e in es) >= 10, timeout=300)
    analysed = [e for e in entries if e["event"] == "analysed"]
    assert sorted(e["sop_instance_uid"] for e in analysed) == sorted(d.SOPInstanceUID for d in batch)
    assert len({e["pid"] for e in analysed}) == 2, "both inference processes took tasks"
    sent = [e for e in entries if e["event"] == "sent"]
    assert sorted(e["sop_instance_uid"] for e in sent) == sorted(d.SOPInstanceUID for d in batch)
    assert len({e["pid"] for e in sent}) == 2, "both report workers sent results"
    assert "warmed up for report" in (node.tmp / "log" / "worker-report2.log").read_text()


def test_inference_batches_across_queued_tasks(tmp_path, redis_url, orthanc_factory, make_node):
    """batch_size > 1: task threads feed one micro-batcher; every instance still gets exactly one result, judged at
    the operating point of its own Patient's Age (the package copy flags every child and no adult)."""
    pkg = tmp_path / "demo-ped"
    shutil.copytree(ROOT / "models" / "demo", pkg)
    meta = json.loads((pkg / "model.json").read_text())
    meta["thresholds"]["gate"] = 1.0
    meta["thresholds"]["gate_pediatric"] = {"threshold": 0.0, "max_age_years": 6.0, "rule": "test"}
    (pkg / "model.json").write_text(json.dumps(meta))
    pacs = orthanc_factory()
    dest = [{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": pacs.dicom_port, "ae_title": "ORTHANC"}]
    node = make_node(redis_url, dest, model={"batch_size": 4, "batch_wait_ms": 500, "path": str(pkg)})
    batch = unique_copies(8)
    for i, ds in enumerate(batch):
        ds.PatientAge = "004Y" if i % 2 else "052Y"
    assert c_store(node.port, batch) == [0] * 8
    sent_uids = [d.SOPInstanceUID for d in batch]
    entries = node.wait_audit(lambda es: sum(e["event"] == "sent" for e in es) >= 8, timeout=300)
    analysed = [e for e in entries if e["event"] == "analysed"]
    assert sorted(e["sop_instance_uid"] for e in analysed) == sorted(sent_uids)
    assert max(e["batch"] for e in analysed) > 1, "queued tasks were batched"
    child = {d.SOPInstanceUID: d.PatientAge == "004Y" for d in batch}
    assert {e["sop_instance_uid"]: e["positive"] for e in analysed} == child, "each film at its own age's point"
