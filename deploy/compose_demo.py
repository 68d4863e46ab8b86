"""`make compose-demo`: the node in containers (deploy/compose.yaml) beside a containerised Orthanc; route the
sample CXRs through it and print where to look.

    .venv/bin/python deploy/compose_demo.py [--samples DIR] [--timeout S]     (images: deploy/containers/build.sh)

Brings the compose project "triage" up with podman-compose (idempotent: running containers are kept), uploads
sample_dicom/ to Orthanc, whose Lua auto-routing sends each CR/DX image to the receiver container, waits until SR +
overlay are in each study, prints a summary and leaves everything running (`make compose-down` stops it).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "deploy"))

from hints import compose_hints, render  # noqa: E402

COMPOSE = ROOT / "deploy" / "compose.yaml"
PROJECT = os.environ.get("TRIAGE_COMPOSE_PROJECT", "triage")
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
OURS = "CXR Triage Node"


def env() -> dict[str, str]:
    return dict(os.environ, CONTAINERS_CONF=os.environ.get("CONTAINERS_CONF",
                                                          str(ROOT / "deploy" / "containers" / "containers.conf")))


def compose(*args: str, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["podman-compose", "-p", PROJECT, "-f", str(COMPOSE), *args], env=env(), check=check,
                          capture_output=capture, text=True)


def podman(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], env=env(), capture_output=True, text=True)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def running(name: str) -> bool:
    out = podman("container", "inspect", "--format", "{{.State.Running}}", name)
    return out.returncode == 0 and out.stdout.strip() == "true"


def wait(what: str, predicate, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if predicate():
                return
        except (requests.RequestException, OSError):
            pass
        time.sleep(1)
    raise SystemExit(f"compose-demo: {what} not ready within {timeout:.0f} s; see "
                     f"`podman-compose -p {PROJECT} -f deploy/compose.yaml logs`")


def main() -> int:
    global PROJECT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", default=str(ROOT / "sample_dicom"))
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--project", default=PROJECT, help="compose project name (default triage; containers <project>_*)")
    args = ap.parse_args()
    PROJECT = args.project
    ports = {"PACS_HTTP_PORT": 8042, "PACS_DICOM_PORT": 4242, "DASHBOARD_PORT": 8484}
    up_already = running(f"{PROJECT}_pacs_1")
    for var, default in ports.items():  # keep the defaults unless taken by something else (or set by the user)
        port = int(os.environ.get(var, default))
        if not up_already:
            while not port_free(port):
                port += 1
        os.environ[var] = str(port)
    os.environ.setdefault("TRIAGE_WEB_PASSWORD", "demo-dashboard-password")
    if up_already:
        out = podman("port", f"{PROJECT}_pacs_1", "8042/tcp").stdout.strip()
        os.environ["PACS_HTTP_PORT"] = out.rsplit(":", 1)[-1] or os.environ["PACS_HTTP_PORT"]
        out = podman("port", f"{PROJECT}_web_1", "8484/tcp").stdout.strip()
        os.environ["DASHBOARD_PORT"] = out.rsplit(":", 1)[-1] or os.environ["DASHBOARD_PORT"]
        out = podman("port", f"{PROJECT}_pacs_1", "4242/tcp").stdout.strip()
        os.environ["PACS_DICOM_PORT"] = out.rsplit(":", 1)[-1] or os.environ["PACS_DICOM_PORT"]
    else:
        print("compose-demo: podman-compose up -d (Orthanc, Redis, receiver, 2 inference workers, report worker, "
              "dashboard)", flush=True)
        out = compose("up", "-d", check=False)
        if out.returncode != 0:
            print(out.stdout[-4000:], out.stderr[-4000:], sep="\n", file=sys.stderr)
            raise SystemExit(f"compose-demo: podman-compose up failed ({out.returncode})")
    pacs = f"http://127.0.0.1:{os.environ['PACS_HTTP_PORT']}"
    dash = f"http://127.0.0.1:{os.environ['DASHBOARD_PORT']}"
    wait("Orthanc", lambda: requests.get(pacs + "/system", timeout=2).ok, 60)
    wait("receiver", lambda: podman("exec", f"{PROJECT}_receiver_1", "triage-health", "listen",
                                    "11112").returncode == 0, 60)
    wait("inference workers", lambda: all(" ready." in podman("logs", f"{PROJECT}_infer_{i}").stdout
                                          + podman("logs", f"{PROJECT}_infer_{i}").stderr for i in (1, 2)), 120)
    samples = sorted(Path(args.samples).glob("*.dcm"))
    studies = {}
    t0 = time.time()
    for p in samples:
        r = requests.post(pacs + "/instances", data=p.read_bytes(), timeout=30)
        r.raise_for_status()
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        studies[str(ds.StudyInstanceUID)] = (p.name, str(ds.SOPInstanceUID))
    print(f"compose-demo: uploaded {len(samples)} CXRs to Orthanc; its auto-routing sends them to the node", flush=True)

    def results(study: str) -> list[dict]:
        hits = [h for h in requests.post(pacs + "/tools/lookup", data=study, timeout=10).json()
                if h["Type"] == "Study"]
        if not hits:
            return []
        return [i for i in requests.get(f"{pacs}/studies/{hits[0]['ID']}/instances", timeout=10).json()
                if i.get("MainDicomTags", {}).get("SOPInstanceUID")
                and requests.get(f"{pacs}/instances/{i['ID']}/simplified-tags", timeout=10).json().get(
                    "Manufacturer") == OURS]

    wait("results of every study", lambda: all(len(results(s)) >= 2 for s in studies), args.timeout)
    audit = podman("exec", f"{PROJECT}_web_1", "cat", "/var/lib/triage-node/shared/audit.jsonl").stdout
    analysed = {}
    for line in audit.splitlines():
        e = json.loads(line)
        if e.get("event") == "analysed":
            analysed[e.get("sop_instance_uid")] = e
    print(f"\ncompose-demo: SR + overlay back in all {len(studies)} studies after {time.time() - t0:.1f} s")
    for study, (name, sop) in studies.items():
        e = analysed.get(sop)
        flag = "" if e is None else f"  p={e.get('probability')}  {'FLAGGED' if e.get('positive') else 'negative'}"
        print(f"  {name}: study {study}: {len(results(study))} results{flag}")
    print("\n" + render(compose_hints(pacs, dash, os.environ["TRIAGE_WEB_PASSWORD"], PROJECT,
                                     int(os.environ["PACS_DICOM_PORT"]), Path(args.samples).resolve())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
