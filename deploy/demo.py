"""`make demo`: a local Orthanc as the demo PACS routes the sample CXRs to the node and gets results back.

    .venv/bin/python deploy/demo.py [--once] [--samples DIR]

Starts Orthanc (Debian package, loopback, DICOMweb on) and `triage-node up` on embedded defaults, uploads
sample_dicom/ to Orthanc, has Orthanc route them to the node as an auto-route does (/modalities/triage/store),
waits until SR + SC are in each study, prints a summary, and keeps running until Ctrl-C (--once: exit instead).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "deploy"))

from hints import demo_hints, render  # noqa: E402

from triage_node.audit import read as read_audit  # noqa: E402
from triage_node.localpacs import LocalOrthanc  # noqa: E402
from triage_node.services import free_port, wait_port  # noqa: E402

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"


def port_or_free(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            return free_port()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--once", action="store_true", help="exit after the summary instead of serving until Ctrl-C")
    ap.add_argument("--samples", default=str(ROOT / "sample_dicom"))
    ap.add_argument("--workdir", default=str(ROOT / "var" / "demo"))
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--keep", dest="fresh", action="store_false",
                    help="keep the previous demo's PACS, spool and audit trail (default: start empty)")
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    if args.fresh and work.is_dir():
        # each demo starts from an empty PACS, spool and audit trail, so what it prints is this run's
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    node_port = port_or_free(11112)
    pacs = LocalOrthanc(work / "orthanc", modalities={"triage": ("TRIAGE", "127.0.0.1", node_port)},
                        http_port=port_or_free(8042), dicom_port=port_or_free(4242))
    node_cfg = work / "node.toml"
    node_cfg.write_text(f"""# written by deploy/demo.py
audit_log = "{work}/audit.jsonl"
[receiver]
port = {node_port}
allowed_calling_aets = ["ORTHANC"]
[spool]
directory = "{work}/spool"
[outputs]
archive_dir = "{work}/results"
[retry]
dead_letter_dir = "{work}/dead-letter"
[[destinations]]
name = "demo-orthanc"
kind = "dicom"
host = "127.0.0.1"
port = {pacs.dicom_port}
ae_title = "ORTHANC"
""")
    stop = {"flag": False}
    signal.signal(signal.SIGINT, lambda *_: stop.update(flag=True))
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    node = None
    print(f"demo: starting Orthanc (http {pacs.http_port}, dicom {pacs.dicom_port}) and the node (port {node_port})")
    pacs.start()
    # worker logs are appended to across runs: only what this run writes counts
    start_sizes = {f: f.stat().st_size for f in (work / "log").glob("worker-*.log")} if (work / "log").is_dir() else {}
    try:
        node = subprocess.Popen([sys.executable, "-m", "triage_node.cli", "up", "--config", str(node_cfg)],
                                cwd=work, start_new_session=True,
                                stdout=open(work / "node.log", "ab"), stderr=subprocess.STDOUT)
        if not wait_port("127.0.0.1", node_port, 120):
            print(f"demo: the node did not start; see {work / 'node.log'}")
            return 1
        # The receiver answers (and spools) at once; wait for the Celery workers too, so the latency printed below
        # is the node's, not the workers' cold start (imports, model load) on a busy machine.
        t_up = time.time()
        logs = {f: start_sizes.get(f, 0) for f in (work / "log" / f"worker-{q}.log" for q in ("infer", "report"))}
        # workers/warmup.py logs "warmed up" (or "warm-up failed") once the model is loaded, after Celery's "ready."
        while not all(f.exists() and re.search(rb"warmed up|warm-up failed", f.read_bytes()[offset:])
                      for f, offset in logs.items()):
            if time.time() - t_up > 300 or node.poll() is not None:
                print(f"demo: the workers did not start; see {work / 'log'}")
                return 1
            time.sleep(0.5)
        print(f"demo: node and workers ready ({time.time() - t_up:.1f} s after the receiver)")
        files = sorted(Path(args.samples).glob("*.dcm"))
        ids, studies = [], {}
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            ids.append(pacs.upload(f)["ID"])
            studies[str(ds.StudyInstanceUID)] = str(ds.SOPInstanceUID)
        print(f"demo: uploaded {len(files)} CXR(s) to Orthanc; routing them to the node (/modalities/triage/store)")
        t0 = wall0 = time.time()
        failed = 0
        for i in ids:  # one store job per CXR, as a routing rule sends each on arrival: one refusal stops no other
            try:
                pacs.route("triage", [i], synchronous=True)
            except requests.HTTPError:  # Orthanc's job fails when the node refuses the C-STORE; the node says why
                failed += 1
        if failed:
            print(f"demo: Orthanc could not store {failed} CXR(s) on the node; the node's reasons are below")
        done: dict[str, float] = {}
        refused: dict[str, str] = {}  # SOP Instance UID -> the node's reason (audit `refused`)
        while len(done) + len(refused) < len(studies) and time.time() - t0 < args.timeout and not stop["flag"]:
            refused = {e["sop_instance_uid"]: e["reason"] for e in read_audit(work / "audit.jsonl")
                       if e["event"] == "refused" and e["ts"] >= wall0 - 1  # this run's, not an earlier one's
                       and e.get("sop_instance_uid") in studies.values()}
            for study, sop in studies.items():
                if study in done or sop in refused:
                    continue
                inst = pacs.study_instances(study)
                if any(i.get("SOPClassUID") == SR_CLASS for i in inst) and \
                        sum(1 for i in inst if i.get("Manufacturer") == "CXR Triage Node") >= 2:
                    done[study] = time.time() - t0
            time.sleep(0.5)
        audit = {e["sop_instance_uid"]: e for e in read_audit(work / "audit.jsonl") if e["event"] == "sent"}
        print(f"\n{'study (last 20 of UID)':24} {'finding':28} {'p':>6} {'boxes':>5} {'result in PACS':>14}")
        for study, sop in studies.items():
            pred_file = work / "results" / sop / "prediction.json"
            if study not in done and sop in refused:
                print(f"{study[-20:]:24} refused by the node: {refused[sop]}")
                continue
            if study not in done or not pred_file.exists():
                print(f"{study[-20:]:24} {'(no result yet)':28}")
                continue
            pred = json.loads(pred_file.read_text())
            finding = "pneumonia-like opacity" if pred["probability"] >= pred["threshold"] else "no opacity detected"
            print(f"{study[-20:]:24} {finding:28} {pred['probability']:6.3f} {len(pred['detections']):5d} "
                  f"{done[study]:12.1f} s")
        lat = [e["latency_s"] for e in audit.values()]
        if lat:
            print(f"\nnode latency C-STORE received -> results sent: median {sorted(lat)[len(lat) // 2]:.1f} s, "
                  f"max {max(lat):.1f} s (CPU)")
        model = next((e.get("model") for e in read_audit(work / "audit.jsonl")
                      if e["event"] == "analysed" and e.get("model")), None)  # the label the workers report
        print("\n" + render(demo_hints(pacs.url, pacs.dicomweb_url, node_port, "TRIAGE", work, node_cfg,
                                       Path(args.samples).resolve())), end="")
        print(f"\nmodel: {model or '(none reported)'}\nAll results come from a DEMO model: NOT FOR CLINICAL USE.")
        if refused:
            print(f"demo: the node refused {len(refused)} CXR(s) (0xA700, nothing kept): "
                  f"{'; '.join(sorted(set(refused.values())))}")
            return 1
        if len(done) < len(studies):
            missing = len(studies) - len(done)
            print(f"demo: {missing} result(s) missing after {args.timeout:.0f} s; see {work / 'node.log'}")
            return 1
        if not args.once:
            print("\nServing; press Ctrl-C to stop.")
            while not stop["flag"]:
                time.sleep(0.5)
        return 0
    finally:
        if node and node.poll() is None:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(40)
            except subprocess.TimeoutExpired:
                node.kill()
        pacs.stop()
        print("demo: stopped")


if __name__ == "__main__":
    sys.exit(main())
