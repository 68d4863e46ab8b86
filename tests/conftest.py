"""Fixtures that start REAL peers: a private redis-server, Orthanc, the node (`triage-node up`) as a subprocess."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from triage_node.services import PrivateRedis, free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = sorted((ROOT / "sample_dicom").glob("*.dcm"))
ARTIFACTS = ROOT / "test-artifacts"
#: Real films that ship with the repository (tests/data/real/README.md: what, from where, terms, how to regenerate).
REAL_DATA = ROOT / "tests" / "data" / "real"
#: The project's shared data pool (``../shared/data`` beside the checkout, or TRIAGE_SHARED_DATA): only for tests
#: marked ``shared_data`` (they need the whole pool); absent, they skip, unless TRIAGE_REQUIRE_SHARED_DATA=1 (CI).
SHARED_DATA = Path(os.environ.get("TRIAGE_SHARED_DATA") or ROOT.parent / "shared" / "data")
#: The spool's intake guard off (``[spool]``): a test that is not about the guard must not depend on how full the
#: machine's disk happens to be. CI runs on a disk shared with other machines; on 2026-12-07 it was over the 75 %
#: watermark of the time and 33 tests got 0xA700. The guard's own tests set their limits (test_receiver.py,
#: test_spool_guard.py, chaos/test_faults.py on a small tmpfs).
SPOOL_UNGUARDED = {"max_disk_usage": 1.0, "reserve_mb": 0}


def pytest_terminal_summary(terminalreporter) -> None:
    """How full the disk under the tests was at the end (shown under -q too): the first thing to read when a run
    fails with 0xA700 or ENOSPC."""
    st = shutil.disk_usage(ROOT)
    terminalreporter.write_line(f"disk under {ROOT}: {st.free / 2**30:.1f} GiB free, "
                                f"{st.used / max(st.used + st.free, 1):.0%} used")


def real_data(*parts: str) -> Path:
    """A path in the repository's real-film fixture (tests/data/real/)."""
    p = REAL_DATA.joinpath(*parts)
    if not p.exists():
        pytest.fail(f"test fixture missing: {p} (regenerate with tests/data/real/make_fixture.py)")
    return p


def shared_data(*parts: str) -> Path:
    """A path in the shared data pool, for tests marked ``shared_data`` only: skipped with the reason when the pool is
    not beside the checkout, a failure instead when TRIAGE_REQUIRE_SHARED_DATA=1 (CI has the pool)."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        why = f"shared data pool missing: {p} (clone the project beside ../shared or set TRIAGE_SHARED_DATA)"
        if os.environ.get("TRIAGE_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(why + "; TRIAGE_REQUIRE_SHARED_DATA=1 makes its absence a failure")
        pytest.skip(why)
    return p


def nih_subset_csv(tmp_path: Path, n: int = 24) -> Path:
    """A labels CSV over the first n/2 positive and n/2 negative real NIH adult films of the fixture (paths
    absolute)."""
    src = real_data("nih", "labels.csv")
    with open(src, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["source"] == "nih_adult"]
    pick = [r for r in rows if r["label"] == "1"][: n // 2] + [r for r in rows if r["label"] == "0"][: n // 2]
    out = tmp_path / "labels.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in pick:
            w.writerow(r | {"path": str(src.parent / r["path"])})
    return out


def require(*binaries: str) -> None:
    missing = [b for b in binaries if not shutil.which(b)]
    if missing:
        pytest.fail(f"required binaries missing: {missing} (run `make setup`)")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    require("redis-server")
    r = PrivateRedis(tmp_path_factory.mktemp("redis"), persist=False).start()
    yield r
    r.stop()


@pytest.fixture
def redis_url(redis_server):
    """A clean database for each test (the server is shared)."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    yield redis_server.url
    client.flushdb()


@pytest.fixture(scope="session")
def sample_paths():
    assert len(SAMPLES) >= 3, "sample_dicom/ must hold the RSNA samples"
    return SAMPLES


def write_toml(path: Path, sections: dict) -> Path:
    """Minimal TOML writer for test configs (str/int/float/bool/list values, tables, arrays of tables)."""
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f"{k} = {val(v)}" for k, v in sections.items()
             if not isinstance(v, (dict, list)) or isinstance(v, list) and v and not isinstance(v[0], dict)]
    for k, v in sections.items():
        if isinstance(v, dict):
            lines.append(f"[{k}]")
            lines += [f"{kk} = {val(vv)}" for kk, vv in v.items()]
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                lines.append(f"[[{k}]]")
                lines += [f"{kk} = {val(vv)}" for kk, vv in item.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def site_point(tmp: Path, threshold: float) -> dict:
    """A site operating point at ``threshold`` for the shipped package (the file ``calibrate --site`` writes), as
    node_config overrides: for tests of the node's flagged / not-flagged paths that need both kinds of film among
    the samples, whatever the shipped model scores them (0.5.0-demo flags all five samples at its own point)."""
    from triage_node.monitoring.site import DEMO_MODEL, package_sha256

    path = tmp / "site" / "operating_point.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": 1, "threshold": threshold, "applies_to": "adult", "package": "",
                                "package_dir": str(DEMO_MODEL), "package_sha256": package_sha256(DEMO_MODEL),
                                "calibrated_at": "2026-12-07T00:00:00Z", "by": "test", "rule": "test",
                                "calibration": {}}))
    return {"site_operating_point": str(path)}


def node_config(tmp: Path, port: int, broker: str, destinations: list[dict], **overrides) -> dict:
    cfg = {
        "audit_log": str(tmp / "audit.jsonl"),
        "log_level": "INFO",
        "receiver": {"ae_title": "TRIAGE", "port": port, "allowed_calling_aets": ["ORTHANC", "STORESCU", "TESTSCU"],
                     "max_associations": 4},
        "spool": {"directory": str(tmp / "spool"), **SPOOL_UNGUARDED},
        "broker": {"url": broker, "visibility_timeout": 60},
        "model": {"path": os.environ.get("TRIAGE_TEST_MODEL", "")},
        "outputs": {"sr": True, "sc": True, "gsps": False, "archive_dir": str(tmp / "results")},
        "retry": {"max_attempts": 3, "backoff_base_s": 0.2, "backoff_max_s": 1.0,
                  "dead_letter_dir": str(tmp / "dead-letter")},
        "destinations": destinations,
        "web": {"port": free_port()},
    }
    for section, values in overrides.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


class NodeProcess:
    """`triage-node up --config` as a real subprocess (receiver + Celery workers)."""

    def __init__(self, tmp: Path, cfg: dict) -> None:
        self.tmp, self.cfg = tmp, cfg
        self.port = cfg["receiver"]["port"]
        self.config_path = write_toml(tmp / "node.toml", cfg)
        self.proc: subprocess.Popen | None = None

    def start(self) -> NodeProcess:
        log = open(self.tmp / "node.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "triage_node.cli", "up", "--config", str(self.config_path)],
                                     cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if not wait_port("127.0.0.1", self.port, 60):
            self.stop()
            raise RuntimeError("node did not start:\n" + (self.tmp / "node.log").read_text()[-3000:])
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def audit(self) -> list[dict]:
        from triage_node.audit import read

        return read(self.cfg["audit_log"])

    def wait_audit(self, predicate, timeout: float = 120.0) -> list[dict]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            entries = self.audit()
            if predicate(entries):
                return entries
            time.sleep(0.3)
        raise TimeoutError("audit condition not met; last lines: " + repr(self.audit()[-8:]) +
                           "\nnode log:\n" + (self.tmp / "node.log").read_text()[-3000:])


@pytest.fixture
def make_node(tmp_path):
    nodes = []

    def factory(broker: str, destinations: list[dict], **overrides) -> NodeProcess:
        cfg = node_config(tmp_path, free_port(), broker, destinations, **overrides)
        n = NodeProcess(tmp_path, cfg).start()
        nodes.append(n)
        return n

    yield factory
    for n in nodes:
        n.stop()


@pytest.fixture
def orthanc_factory(tmp_path):
    from triage_node.localpacs import LocalOrthanc

    require("Orthanc")
    started = []

    def factory(modalities=None, name="orthanc"):
        o = LocalOrthanc(tmp_path / name, modalities=modalities).start()
        started.append(o)
        return o

    yield factory
    for o in started:
        o.stop()


def read_sample(i: int = 0) -> pydicom.Dataset:
    return pydicom.dcmread(SAMPLES[i])


def c_store(port: int, datasets: list[pydicom.Dataset], calling: str = "TESTSCU", called: str = "TRIAGE") -> list[int]:
    """Send datasets over one real association; returns the status of each C-STORE."""
    from pynetdicom import AE

    from triage_node.transport.scu import guard_responses

    ae = AE(ae_title=calling)
    for sop, ts in sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}):
        ae.add_requested_context(sop, [ts])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "association refused"
    guard_responses(assoc)  # pynetdicom's requestor could lose a response to its own loop (transport/scu.py)
    try:
        return [int(assoc.send_c_store(d).Status) for d in datasets]
    finally:
        assoc.release()
