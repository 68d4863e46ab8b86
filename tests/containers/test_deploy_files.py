"""The deployment files parse as their tools read them: systemd units (systemd-analyze verify, pointed at this
checkout and its venv) and deploy/compose.yaml (every service has an image we build, a restart policy and a
healthcheck; published ports stay on loopback)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

UNITS = ROOT / "deploy" / "systemd"


def test_systemd_units_verify(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed (package systemd)")
    names = sorted(p.name for p in UNITS.iterdir() if p.suffix in (".service", ".target"))
    assert {"triage-receiver.service", "triage-worker@.service", "triage-web.service", "triage-node.target",
            "triage-node.service"} <= set(names)
    for name in names:
        # pointed at this checkout and the venv running the tests
        text = (UNITS / name).read_text().replace("/opt/triage-node/.venv", sys.prefix).replace(
            "/opt/triage-node", str(ROOT))
        (tmp_path / name).write_text(text)
    (tmp_path / "triage-worker@infer.service").symlink_to(tmp_path / "triage-worker@.service")
    units = [str(tmp_path / n) for n in names if n != "triage-worker@.service"] + [
        str(tmp_path / "triage-worker@infer.service")]
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True)
    problems = [line for line in (out.stdout + out.stderr).splitlines()
                if "triage" in line and "network-online.target" not in line and "redis-server.service" not in line]
    assert problems == [], problems


def compose_doc() -> dict:
    """deploy/compose.yaml as podman-compose reads it (PyYAML of the system Python, a podman-compose dependency;
    the project's venv does not carry PyYAML)."""
    if not shutil.which("podman-compose"):
        pytest.skip("podman-compose is not installed (deploy/setup.sh installs it)")
    code = "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))"
    out = subprocess.run(["/usr/bin/python3", "-c", code, str(ROOT / "deploy" / "compose.yaml")],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_compose_file_services():
    doc = compose_doc()
    services = doc["services"]
    assert {"pacs", "redis", "receiver", "infer", "report", "web"} <= set(services)
    built = {"localhost/triage-node:latest", "localhost/triage-infer:latest", "localhost/triage-redis:latest",
             "localhost/triage-orthanc:latest"}
    for name, svc in services.items():
        assert svc["image"] in built, name
        assert svc.get("restart") == "unless-stopped", name
        assert isinstance(svc.get("healthcheck", {}).get("test"), str), name
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert services["infer"]["deploy"]["replicas"] >= 2
    assert services["receiver"]["environment"]["TRIAGE_INSTANCES_URL"].startswith("http://receiver:")
