"""What `make demo` tells a user to run works as printed: deploy/demo.py serving (real Orthanc, `triage-node up`,
Celery workers), its "Where to look" block read back from its output (deploy/hints.py) and every URL opened, every
path looked at and every command run in the repository's root, on the project's own sample films."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import requests
from conftest import ROOT, SAMPLES, require

from triage_node.audit import read as read_audit

sys.path.insert(0, str(ROOT / "deploy"))
from hints import Hint, demo_hints, parse

pytestmark = pytest.mark.integration
MODEL = os.environ.get("TRIAGE_TEST_MODEL", "")


def check_hint(h: Hint, env: dict[str, str] | None = None, auth: tuple[str, str] | None = None) -> str:
    """Open, look at or run one hint exactly as printed; returns what it answered."""
    if h.kind == "url":
        r = requests.get(h.text, timeout=30)
        if r.status_code == 401 and auth:
            r = requests.get(h.text, auth=auth, timeout=30)
        assert r.status_code == 200, f"{h.label}: GET {h.text} -> {r.status_code}"
        return r.text
    if h.kind == "path":
        assert Path(h.text).exists(), f"{h.label}: {h.text} does not exist"
        return ""
    out = subprocess.run(["bash", "-c", h.text], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{h.label}: `{h.text}` exited {out.returncode}:\n{(out.stdout + out.stderr)[-3000:]}"
    return out.stdout + out.stderr


def _received(audit: Path, sops: set[str]) -> int:
    return sum(1 for e in read_audit(audit) if e["event"] == "received" and e.get("sop_instance_uid") in sops)


def test_every_hint_make_demo_prints_works_as_printed(tmp_path):
    require("Orthanc", "redis-server", "storescu")
    env = dict(os.environ, TRIAGE_SPOOL_MAX_DISK_USAGE="1.0", TRIAGE_SPOOL_RESERVE_MB="0")
    if MODEL:
        env["TRIAGE_MODEL_PATH"] = MODEL
    log = tmp_path / "demo.out"
    with open(log, "w") as f:
        demo = subprocess.Popen([sys.executable, str(ROOT / "deploy" / "demo.py"), "--workdir", str(tmp_path / "w"),
                                 "--timeout", "400"], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
    try:
        deadline = time.time() + 600
        while "Serving; press Ctrl-C" not in log.read_text():
            assert demo.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        printed = log.read_text()
        hints = parse(printed)
        expected = demo_hints("u", "u", 0, "A", tmp_path, tmp_path, tmp_path)
        assert [h.label for h in hints] == [h.label for h in expected], printed[-3000:]
        sops = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in SAMPLES}
        audit = tmp_path / "w" / "audit.jsonl"
        for h in hints:
            before = _received(audit, sops)
            answer = check_hint(h, env)
            if h.label == "status":
                assert f"sent {len(SAMPLES)}" in answer, answer
            if h.label == "PNG previews":
                assert len(list(Path(h.text).glob("*/preview.png"))) == len(SAMPLES)
            if h.label == "send more":  # the node received every sample again (as a PACS resending them)
                assert _received(audit, sops) == before + len(SAMPLES), answer
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGINT)
            try:
                demo.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(demo.pid, signal.SIGKILL)
                demo.wait(10)


def test_every_command_the_readme_names_exists():
    """README names `make` targets and `triage-node` subcommands for a user to run: each one exists (`make -n`; the
    subcommand in the CLI's parser). The make targets themselves run in their own tests (demo: test_cli.py and the test
    above; compose: tests/containers/test_compose.py; test and lint: CI)."""
    import argparse

    from triage_node.cli import build_parser

    readme = (ROOT / "README.md").read_text()
    targets = sorted(set(re.findall(r"(?:^|`)make ([a-z][a-z-]*)", readme, re.M)))
    assert {"demo", "test", "compose-demo", "compose-down"} <= set(targets)
    for target in targets:
        r = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"make {target}: {r.stderr[-500:]}"
    assert (ROOT / ".ci" / "run").is_file() and "bash .ci/run" in readme
    actions = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    subcommands = set(actions[0].choices)
    named = set(re.findall(r"`triage-node ([a-z][a-z-]*)", readme))
    assert named and named <= subcommands, named - subcommands
