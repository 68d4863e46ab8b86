"""A local Orthanc (the Debian package) as a demo / test PACS: start it, upload, route to the node, look for results.

Used by ``make demo`` and the integration tests; talks to Orthanc's REST API and DICOMweb plugin only.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import requests

from .services import free_port, wait_port

DICOMWEB_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")


def dicomweb_plugin() -> str | None:
    for d in DICOMWEB_PLUGIN_DIRS:
        p = Path(d) / "libOrthancDicomWeb.so"
        if p.exists():
            return str(p)
    return None


class LocalOrthanc:
    """An Orthanc process on loopback with its own storage; ``modalities`` maps name -> (AET, host, port)."""

    def __init__(self, workdir: str | Path, aet: str = "ORTHANC",
                 modalities: dict[str, tuple[str, str, int]] | None = None,
                 http_port: int | None = None, dicom_port: int | None = None,
                 users: dict[str, str] | None = None, dicomweb_servers: dict[str, list] | None = None) -> None:
        self.dir = Path(workdir).resolve()
        self.aet = aet
        self.modalities = modalities or {}
        self.http_port = http_port or free_port()
        self.dicom_port = dicom_port or free_port()
        self.users = users or {}
        self.dicomweb_servers = dicomweb_servers or {}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self, timeout: float = 30.0) -> LocalOrthanc:
        exe = shutil.which("Orthanc")
        if not exe:
            raise RuntimeError("Orthanc not found: install the Debian packages orthanc orthanc-dicomweb (make setup)")
        (self.dir / "db").mkdir(parents=True, exist_ok=True)
        plugins = [p for p in [dicomweb_plugin()] if p]
        cfg = {
            "Name": "triage-demo-pacs",
            "StorageDirectory": str(self.dir / "db"), "IndexDirectory": str(self.dir / "db"),
            "DicomAet": self.aet, "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users, "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True, "HttpServerEnabled": True,
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "Plugins": plugins, "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": self.dicomweb_servers},
            "StableAge": 2, "ConcurrentJobs": 2, "LogExportedResources": False,
        }
        (self.dir / "orthanc.json").write_text(json.dumps(cfg, indent=1))
        log = open(self.dir / "orthanc.log", "ab")
        self.proc = subprocess.Popen([exe, str(self.dir / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
        if not (wait_port("127.0.0.1", self.http_port, timeout) and wait_port("127.0.0.1", self.dicom_port, timeout)):
            self.stop()
            raise RuntimeError(f"Orthanc did not start, see {self.dir / 'orthanc.log'}")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    # -- REST helpers ------------------------------------------------------------------------------------------
    @property
    def auth(self):
        return next(iter(self.users.items())) if self.users else None

    def get(self, path: str, **kw):
        r = requests.get(self.url + path, timeout=30, auth=self.auth, **kw)
        r.raise_for_status()
        return r.json() if "json" in r.headers.get("content-type", "") else r.content

    def upload(self, path: str | Path) -> dict:
        r = requests.post(f"{self.url}/instances", data=Path(path).read_bytes(), timeout=30, auth=self.auth)
        r.raise_for_status()
        return r.json()

    def route(self, modality: str, instance_ids: list[str], synchronous: bool = True) -> dict:
        """Send instances to a configured modality, as a PACS auto-routing rule does (``/modalities/x/store``)."""
        body: dict[str, list[str] | bool] = {"Resources": instance_ids, "Synchronous": synchronous}
        r = requests.post(f"{self.url}/modalities/{modality}/store", json=body, timeout=120, auth=self.auth)
        r.raise_for_status()
        return r.json()

    def study_instances(self, study_instance_uid: str) -> list[dict]:
        """Tags of every instance in the study with this Study Instance UID (empty if the study is unknown)."""
        found = requests.post(f"{self.url}/tools/lookup", data=study_instance_uid, timeout=30,
                              auth=self.auth).json()
        out = []
        for hit in found:
            if hit["Type"] != "Study":
                continue
            for inst in self.get(f"/studies/{hit['ID']}/instances"):
                tags = self.get(f"/instances/{inst['ID']}/simplified-tags")
                tags["_id"] = inst["ID"]
                out.append(tags)
        return out

    def instance_file(self, orthanc_id: str) -> bytes:
        return self.get(f"/instances/{orthanc_id}/file")

    def wait_for(self, study_instance_uid: str, predicate, timeout: float = 120.0, interval: float = 0.5) -> list[dict]:
        """Poll the study until ``predicate(instances)`` holds; returns the instances (raises TimeoutError)."""
        deadline = time.time() + timeout
        last: list[dict] = []
        while time.time() < deadline:
            last = self.study_instances(study_instance_uid)
            if predicate(last):
                return last
            time.sleep(interval)
        raise TimeoutError(f"study {study_instance_uid}: condition not met in {timeout:.0f} s "
                           f"(have {[i.get('Modality') for i in last]})")
