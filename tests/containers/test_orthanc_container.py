"""Orthanc in a container (the image built from deploy/containers/), the node on the host (`triage-node up`):
Orthanc's own auto-routing (Lua, CR/DX) sends the CXRs to the host's receiver over host.containers.internal, and SR +
overlay come back into the same study, dciodvfy-clean: the assertions of tests/test_e2e.py with a containerised PACS."""

from __future__ import annotations

import io
import subprocess
import time

import pydicom
import pytest
import requests
from conftest import SAMPLES, require

from triage_node.localpacs import LocalOrthanc
from triage_node.services import free_port

from .conftest import image, record_timing, wait_until

# the first run on a machine builds the images inside this test (the infer image takes ~10 min on 2 cores)
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
OURS = "CXR Triage Node"


def has_results(instances) -> bool:
    return (sum(1 for i in instances if i.get("SOPClassUID") == SR_CLASS) >= 1
            and sum(1 for i in instances if i.get("Manufacturer") == OURS and i.get("SOPClassUID") == SC_CLASS) >= 1)


def dciodvfy_errors(data: bytes, tmp_path, name: str) -> list[str]:
    f = tmp_path / name
    f.write_bytes(data)
    out = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def orthanc_container(pod, tmp_path, network: str | None = None, **env) -> LocalOrthanc:
    """The triage-orthanc image with published loopback ports; returned as a REST client (LocalOrthanc, not started)."""
    http, dicom = free_port(), free_port()
    pod.run("pacs", image("orthanc"), env=env, network=network,
            ports=[f"127.0.0.1:{http}:8042", f"127.0.0.1:{dicom}:4242"])
    pacs = LocalOrthanc(tmp_path / "pacs-client", http_port=http, dicom_port=dicom)

    def up():
        try:
            return requests.get(pacs.url + "/system", timeout=2).ok
        except requests.RequestException:
            return False

    wait_until(up, 60, what="Orthanc container answering on its published port")
    return pacs


def test_orthanc_container_autoroutes_to_host_node_and_gets_sr_and_overlay_back(tmp_path, pod, redis_url, make_node):
    require("dciodvfy", "dsrdump")
    node_port = free_port()
    t0 = time.time()
    pacs = orthanc_container(pod, tmp_path, TRIAGE_NODE_HOST="host.containers.internal",
                             TRIAGE_NODE_PORT=str(node_port), TRIAGE_NODE_AET="TRIAGE")
    # the node listens beyond loopback so the container reaches it; only the PACS's AE title may associate
    dest = [{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": pacs.dicom_port, "ae_title": "ORTHANC",
             "calling_ae_title": "TRIAGE"}]
    node = make_node(redis_url, dest, receiver={"port": node_port, "bind": "0.0.0.0",
                                                "allowed_calling_aets": ["ORTHANC"]})
    studies = []
    for p in SAMPLES[:3]:
        pacs.upload(p)  # Orthanc's Lua auto-routing sends each CR/DX instance on to the node
        studies.append(str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID))
    for study in studies:
        instances = pacs.wait_for(study, has_results, timeout=240)
        time.sleep(1)  # a duplicate would land now
        instances = pacs.study_instances(study)
        ours = [i for i in instances if i.get("Manufacturer") == OURS]
        assert len(ours) == 2, "exactly one SR and one SC per source, in the source study"
        assert len({i["SeriesInstanceUID"] for i in instances}) == 3, "source, SR and SC each in their own series"
        for inst in ours:
            data = pacs.instance_file(inst["_id"])
            assert dciodvfy_errors(data, tmp_path, f"{inst['SOPInstanceUID']}.dcm") == []
            ds = pydicom.dcmread(io.BytesIO(data))
            assert ds.StudyInstanceUID == study and ds.PatientID
            if ds.SOPClassUID == SR_CLASS:
                f = tmp_path / "sr.dcm"
                f.write_bytes(data)
                dump = subprocess.run(["dsrdump", str(f)], capture_output=True, text=True)
                assert dump.returncode == 0 and "Imaging Measurement Report" in dump.stdout
            else:
                assert ds.BurnedInAnnotation == "YES"
    entries = node.audit()
    received = [e for e in entries if e["event"] == "received"]
    assert len([e for e in entries if e["event"] == "sent"]) == 3
    # the node's own results were not routed back to it (SR, and the overlay with Modality OT, are not CR/DX)
    assert len(received) == 3 and not [e for e in entries if e["event"] == "skipped"]
    record_timing("test_orthanc_container_s", time.time() - t0)
