"""`make compose-demo` end to end: deploy/compose.yaml brought up by podman-compose under a project name of its own
(Orthanc, Redis, receiver, two inference workers, report worker, dashboard), sample_dicom/ routed through it by
Orthanc's auto-routing, SR + overlay back in every study; every container's healthcheck passes; the dashboard's
/metrics counts what was sent; every hint the demo prints (deploy/hints.py) works as printed, `make compose-down`
last; `down -v` leaves nothing behind."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import time
import uuid

import pytest
import requests
from conftest import ROOT, SAMPLES
from test_hints import check_hint

from triage_node import config as config_mod
from triage_node.services import free_port

from .conftest import image, podman, podman_env, record_timing

pytestmark = [pytest.mark.integration, pytest.mark.timeout(2400)]

COMPOSE = ROOT / "deploy" / "compose.yaml"
sys.path.insert(0, str(ROOT / "deploy"))
from hints import compose_hints, parse  # noqa: E402

SERVICES = ("redis_1", "pacs_1", "receiver_1", "infer_1", "infer_2", "report_1", "web_1")


def running_containers(project: str) -> list[str]:
    return podman("ps", "--filter", f"name={project}_", "--format", "{{.Names}}", check=False).stdout.split()


def test_compose_demo_routes_the_samples_through_the_containers(podman_ok, tmp_path):
    if not hasattr(config_mod, "InstancesConfig"):
        pytest.skip("needs the receiver's instance server ([instances], issue #12 part 1, branch issue-12a)")
    if not shutil.which("podman-compose"):
        pytest.skip("podman-compose is not installed (deploy/setup.sh installs it)")
    for name in ("redis", "orthanc", "node", "infer"):
        image(name)  # built (or found current) and tagged :latest, as compose.yaml names them
    project = "tt" + uuid.uuid4().hex[:8]
    password = secrets.token_hex(8)
    env = dict(podman_env(), PACS_HTTP_PORT=str(free_port()), PACS_DICOM_PORT=str(free_port()),
               DASHBOARD_PORT=str(free_port()), TRIAGE_WEB_PASSWORD=password,
               TRIAGE_INSTANCES_TOKEN=secrets.token_hex(16))
    t0 = time.time()
    try:
        out = subprocess.run([sys.executable, str(ROOT / "deploy" / "compose_demo.py"), "--project", project,
                              "--timeout", "300"], env=env, capture_output=True, text=True, timeout=900)
        (tmp_path / "compose_demo.log").write_text(out.stdout + out.stderr)
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
        assert f"SR + overlay back in all {len(SAMPLES)} studies" in out.stdout
        for svc in SERVICES:
            check = podman("healthcheck", "run", f"{project}_{svc}", check=False)
            assert check.returncode == 0, f"{svc} unhealthy: {check.stdout} {check.stderr}"
        metrics = requests.get(f"http://127.0.0.1:{env['DASHBOARD_PORT']}/metrics", auth=("admin", password),
                               timeout=10).text
        assert f"triage_results_sent_total {float(len(SAMPLES))}" in metrics
        ready = requests.get(f"http://127.0.0.1:{env['DASHBOARD_PORT']}/readyz", auth=("admin", password),
                             timeout=30).json()
        assert ready["checks"]["receiver_listening"]["ok"], ready  # C-ECHO from the web container to the receiver
        assert requests.get(f"http://127.0.0.1:{env['DASHBOARD_PORT']}/", timeout=10).status_code == 401
        hints = parse(out.stdout)
        labels = [h.label for h in compose_hints("u", "u", "p", project, 0, ROOT)]
        assert [h.label for h in hints] == labels, out.stdout[-3000:]
        for h in hints:  # as printed, in the repository's root; "Stop" (make compose-down) comes last
            answer = check_hint(h, env, auth=("admin", password))  # storescu exits 1 when a store fails
            if h.label == "Stop":
                assert not running_containers(project), answer
    finally:
        for svc in SERVICES:
            (tmp_path / f"{svc}.log").write_text(podman("logs", f"{project}_{svc}", check=False).stdout)
        subprocess.run(["podman-compose", "-p", project, "-f", str(COMPOSE), "down", "-v"], env=env,
                       capture_output=True, timeout=300)
        podman("network", "rm", "-f", f"{project}_default", check=False)
    left = podman("ps", "-a", "--filter", f"name={project}_", "--format", "{{.Names}}").stdout.split()
    assert left == []
    assert not [v for v in podman("volume", "ls", "--format", "{{.Name}}").stdout.split() if v.startswith(project)]
    record_timing("test_compose_s", time.time() - t0)
