"""Containers for the integration tests: podman with the project's containers.conf, images built by
deploy/containers/build.sh on first use (cached by input hash), and a small helper to run and clean up containers.

The tests here skip only when podman cannot run containers on this machine (and say why); `make test` installs
podman (deploy/setup.sh), so on a fresh Debian machine they run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from conftest import ARTIFACTS, ROOT

CONTAINERS_CONF = ROOT / "deploy" / "containers" / "containers.conf"
BUILD = ROOT / "deploy" / "containers" / "build.sh"
TIMINGS = ARTIFACTS / "containers"


def podman_env() -> dict[str, str]:
    return dict(os.environ, CONTAINERS_CONF=os.environ.get("CONTAINERS_CONF", str(CONTAINERS_CONF)))


def podman(*args: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(["podman", *args], capture_output=True, text=True, env=podman_env(), timeout=timeout, **kw)
    if check and out.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])}... failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return out


def record_timing(name: str, seconds: float) -> None:
    TIMINGS.mkdir(parents=True, exist_ok=True)
    f = TIMINGS / "timings.json"
    data = json.loads(f.read_text()) if f.exists() else {}
    data[name] = round(seconds, 1)
    f.write_text(json.dumps(data, indent=1) + "\n")


@pytest.fixture(scope="session")
def podman_ok() -> None:
    """podman runs a container here, or the test is skipped with the reason (only then)."""
    if not shutil.which("podman"):
        pytest.skip("podman is not installed (deploy/setup.sh installs it: apt-get install podman runc mmdebstrap)")
    if os.geteuid() != 0:
        pytest.skip("the container tests use rootful podman and mmdebstrap: run as root (as `make test` does in CI)")
    info = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False)
    if info.returncode != 0:
        pytest.skip(f"podman cannot run on this machine: {info.stderr.strip()[-500:]}")


_built: dict[str, str] = {}


def image(name: str) -> str:
    """The image ``localhost/triage-<name>:<hash>``, built (once per input hash, on first use) by build.sh."""
    if name not in _built:
        t0 = time.time()
        out = subprocess.run(["bash", str(BUILD), name], capture_output=True, text=True, env=podman_env(),
                             timeout=3000)
        if out.returncode != 0:
            pytest.fail(f"building the {name} image failed:\n{out.stderr[-4000:]}")
        _built[name] = out.stdout.strip().splitlines()[-1]
        record_timing(f"build_{name}_s", time.time() - t0)
    return _built[name]


class Pod:
    """Containers and networks made by one test, removed at its end (logs kept under its tmp dir)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.tag = "tt" + uuid.uuid4().hex[:8]
        self.containers: list[str] = []
        self.networks: list[str] = []

    def network(self) -> str:
        name = f"{self.tag}-net"
        podman("network", "create", name)
        self.networks.append(name)
        return name

    def run(self, name: str, img: str, *args: str, env: dict[str, str] | None = None, network: str | None = None,
            alias: str | None = None, ports: list[str] | None = None, volumes: list[str] | None = None,
            entrypoint: str | None = None, extra: list[str] | None = None) -> str:
        cname = f"{self.tag}-{name}"
        cmd = ["run", "-d", "--name", cname, "--hostname", name]
        if network:
            cmd += ["--network", network, "--network-alias", alias or name]
        for k, v in (env or {}).items():
            cmd += ["-e", f"{k}={v}"]
        for p in ports or []:
            cmd += ["-p", p]
        for v in volumes or []:
            cmd += ["-v", v]
        if entrypoint:
            cmd += ["--entrypoint", entrypoint]
        cmd += [*(extra or []), img, *args]
        podman(*cmd)
        self.containers.append(cname)
        return cname

    def logs(self, cname: str) -> str:
        out = podman("logs", cname, check=False)
        return out.stdout + out.stderr

    def exec(self, cname: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return podman("exec", cname, *args, check=check)

    def read_file(self, cname: str, path: str) -> str:
        """A file inside the container (running or stopped): ``podman cp`` out of its own file system."""
        dest = self.tmp / f"cp-{cname}-{Path(path).name}"
        out = podman("cp", f"{cname}:{path}", str(dest), check=False)
        return dest.read_text(errors="replace") if out.returncode == 0 and dest.exists() else ""

    def cleanup(self) -> None:
        for c in self.containers:
            (self.tmp / f"{c}.log").write_text(self.logs(c))
        if self.containers:
            podman("rm", "-f", "-t", "2", *self.containers, check=False)
        for n in self.networks:
            podman("network", "rm", "-f", n, check=False)


@pytest.fixture
def pod(podman_ok, tmp_path):
    p = Pod(tmp_path)
    yield p
    p.cleanup()


def wait_until(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not met within {timeout:.0f} s")
