"""Several hosts, simulated by containers with separate file systems: Orthanc (PACS) -> receiver container ->
Redis container -> two inference worker containers -> report worker container -> back to Orthanc. Nothing is shared
but the network: instances reach the workers through the receiver's instance server (``[instances]``, the Celery
payload's ``source_url``), each container has its own spool and audit trail.

One inference worker container is killed (SIGKILL, the whole container) while it holds a task; every instance still
gets exactly one result: one SR + one overlay in its study, one ``sent`` in the report worker's audit trail, and the
receiver's spool ends empty (each instance released once its result was sent)."""

from __future__ import annotations

import json
import secrets
import time

import pydicom
import pytest
from conftest import SAMPLES, write_toml
from pydicom.uid import generate_uid

from triage_node import config as config_mod

from .conftest import image, podman, record_timing, wait_until
from .test_orthanc_container import OURS, SC_CLASS, SR_CLASS, orthanc_container

# the first run on a machine builds the images inside this test (the infer image takes ~10 min on 2 cores)
pytestmark = [pytest.mark.integration, pytest.mark.timeout(2400)]

N_INSTANCES = 10
DATA = "/var/lib/triage-node"
VISIBILITY_S = 15  # a task held by the killed container comes back to the other worker after this


def unique_instances(tmp_path, n: int) -> list[tuple]:
    """``n`` CR instances made from the samples, each in a study of its own (fresh UIDs)."""
    out = []
    for i in range(n):
        ds = pydicom.dcmread(SAMPLES[i % len(SAMPLES)])
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = tmp_path / f"in-{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append((path, str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)))
    return out


def audit_lines(pod, cname: str) -> list[dict]:
    text = pod.read_file(cname, f"{DATA}/audit.jsonl")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_worker_container_killed_mid_run_every_instance_gets_exactly_one_result(tmp_path, pod):
    if not hasattr(config_mod, "InstancesConfig"):
        pytest.skip("needs the receiver's instance server ([instances], issue #12 part 1, branch issue-12a)")
    t0 = time.time()
    node_img, infer_img, redis_img = image("node"), image("infer"), image("redis")
    net = pod.network()
    token = secrets.token_hex(16)
    cfg = write_toml(tmp_path / "node.toml", {
        "audit_log": f"{DATA}/audit.jsonl",
        "receiver": {"ae_title": "TRIAGE", "bind": "0.0.0.0", "port": 11112, "allowed_calling_aets": ["ORTHANC"]},
        "spool": {"directory": f"{DATA}/spool", "max_disk_usage": 0.99, "reserve_mb": 0},
        "broker": {"url": "redis://redis:6379/0", "visibility_timeout": VISIBILITY_S},
        "model": {"device": "cpu"},
        "outputs": {"sr": True, "sc": True, "gsps": False, "archive_dir": f"{DATA}/results"},
        "retry": {"max_attempts": 5, "backoff_base_s": 0.5, "backoff_max_s": 5.0,
                  "dead_letter_dir": f"{DATA}/dead-letter"},
        "destinations": [{"name": "pacs", "kind": "dicom", "host": "pacs", "port": 4242, "ae_title": "ORTHANC",
                          "calling_ae_title": "TRIAGE"}],
        "web": {"enabled": False},
    })
    # the configuration file is the only thing mounted (read-only); spool, audit trail and results are per container
    common = {"network": net, "volumes": [f"{cfg}:/etc/triage-node/node.toml:ro"],
              "env": {"TRIAGE_CONFIG": "/etc/triage-node/node.toml", "TRIAGE_INSTANCES_TOKEN": token}}
    pod.run("redis", redis_img, network=net)
    pacs = orthanc_container(pod, tmp_path, network=net, TRIAGE_NODE_HOST="receiver", TRIAGE_NODE_PORT="11112")
    receiver = pod.run("receiver", node_img, "serve", **{**common, "env": {
        **common["env"], "TRIAGE_INSTANCES_URL": "http://receiver:8490", "TRIAGE_INSTANCES_BIND": "0.0.0.0",
        "TRIAGE_INSTANCES_PORT": "8490"}})
    workers = [pod.run(f"infer-{i}", infer_img, "worker", "--queue", "infer", **common) for i in (1, 2)]
    report = pod.run("report", node_img, "worker", "--queue", "report", **common)
    wait_until(lambda: pod.exec(receiver, "triage-health", "listen", "11112", check=False).returncode == 0, 60,
               what="receiver container listening")
    wait_until(lambda: all(" ready." in pod.logs(c) for c in [*workers, report]), 120, what="workers ready")
    t_ready = time.time()

    items = unique_instances(tmp_path, N_INSTANCES)
    for path, _, _ in items:
        pacs.upload(path)  # Orthanc auto-routes each CR to the receiver container
    # kill the first inference worker container seen holding a task (the whole container: its spool goes with it)
    def holding(c: str) -> bool:
        out = pod.exec(c, "cat", f"{DATA}/audit.jsonl", check=False).stdout
        events = [json.loads(line) for line in out.splitlines() if line.strip()]
        started = {e["sop_instance_uid"] for e in events if e["event"] == "analyze_started"}
        return bool(started - {e["sop_instance_uid"] for e in events if e["event"] == "analysed"})

    victim = wait_until(lambda: next((c for c in workers if holding(c)), None), 120, interval=0.2,
                        what="an inference worker holding a task")
    podman("kill", "-s", "KILL", victim)
    survivor = next(c for c in workers if c != victim)

    def all_results():
        return all(any(i.get("SOPClassUID") == SR_CLASS for i in pacs.study_instances(study))
                   and any(i.get("Manufacturer") == OURS and i.get("SOPClassUID") == SC_CLASS
                           for i in pacs.study_instances(study)) for _, study, _ in items)

    wait_until(all_results, 300, interval=2, what=f"results for all {N_INSTANCES} instances in Orthanc")
    t_done = time.time()
    time.sleep(VISIBILITY_S + 5)  # a duplicate delivery would land now
    for _, study, sop in items:
        ours = [i for i in pacs.study_instances(study) if i.get("Manufacturer") == OURS]
        assert sorted(i["SOPClassUID"] for i in ours) == [SC_CLASS, SR_CLASS], f"{sop}: exactly one SR + one SC"
    sent = [e for e in audit_lines(pod, report) if e["event"] == "sent"]
    per_sop = {sop: sum(1 for e in sent if e.get("sop_instance_uid") == sop) for _, _, sop in items}
    assert per_sop == {sop: 1 for _, _, sop in items}, "one result sent per instance, none twice"
    started_victim = {e["sop_instance_uid"] for e in audit_lines(pod, victim) if e["event"] == "analyze_started"}
    finished_victim = {e["sop_instance_uid"] for e in audit_lines(pod, victim) if e["event"] == "analysed"}
    in_flight = started_victim - finished_victim
    survivor_started = {e["sop_instance_uid"] for e in audit_lines(pod, survivor) if e["event"] == "analyze_started"}
    assert in_flight, "the killed container held a task when it died"
    assert in_flight <= survivor_started, "the task held by the killed container was delivered to the other worker"
    # the receiver released every instance once its result was sent: nothing stranded in its spool
    left = pod.exec(receiver, "find", f"{DATA}/spool/instances", "-type", "f").stdout.split()
    assert left == []
    record_timing("test_multihost_s", time.time() - t0)
    record_timing("test_multihost_ready_s", t_ready - t0)
    record_timing("test_multihost_results_after_ready_s", t_done - t_ready)
