"""The no-broker path (`triage-node analyze`), `status`, and `make demo`'s script end to end (--once)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pydicom
from conftest import ROOT, SAMPLES, require

MODEL = os.environ.get("TRIAGE_TEST_MODEL", "")


def run(*args, cwd=None, timeout=600, env=None):
    return subprocess.run([sys.executable, "-m", "triage_node.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def test_analyze_writes_sr_sc_and_preview(tmp_path):
    out = tmp_path / "out"
    args = ["analyze", str(SAMPLES[0]), "--out", str(out)] + (["--model", MODEL] if MODEL else [])
    res = run(*args)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout)
    assert "NOT FOR CLINICAL USE" in summary["model"]
    assert (out / "preview.png").exists()
    kinds = sorted(p.name.split("-")[0] for p in out.glob("*.dcm"))
    assert kinds == ["sc", "sr"]
    sr = pydicom.dcmread(next(out.glob("sr-*.dcm")))
    src = pydicom.dcmread(SAMPLES[0], stop_before_pixels=True)
    assert sr.StudyInstanceUID == src.StudyInstanceUID and sr.SeriesInstanceUID != src.SeriesInstanceUID
    # deterministic output UIDs: a second run replaces rather than duplicates
    res2 = run(*args)
    assert res2.returncode == 0
    assert len(list(out.glob("sr-*.dcm"))) == 1


def test_analyze_refuses_non_cxr_with_reason(tmp_path):
    ds = pydicom.dcmread(SAMPLES[0])
    ds.Modality = "MR"
    f = tmp_path / "mr.dcm"
    ds.save_as(f)
    res = run("analyze", str(f), "--out", str(tmp_path / "o"), "--model", "untrained")
    assert res.returncode == 2 and "NotEligible: modality MR not processed" in res.stderr


def test_demo_once_routes_samples_through_orthanc(tmp_path):
    require("Orthanc", "redis-server")
    # the demo on its embedded defaults, but for the spool's intake guard: not how full this disk is decides it
    env = dict(os.environ, TRIAGE_SPOOL_MAX_DISK_USAGE="1.0", TRIAGE_SPOOL_RESERVE_MB="0")
    if MODEL:
        env["TRIAGE_MODEL_PATH"] = MODEL
    res = subprocess.run([sys.executable, str(ROOT / "deploy" / "demo.py"), "--once", "--workdir", str(tmp_path),
                          "--timeout", "400"], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "no result yet" not in res.stdout
    assert res.stdout.count("NOT FOR CLINICAL USE") >= 1
    assert "model: (none reported)" not in res.stdout and re.search(r"^model: \S+ \S+", res.stdout, re.M), \
        "the demo names the model the workers used"
    for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in SAMPLES):
        assert str(ds.StudyInstanceUID)[-20:] in res.stdout
    previews = list((tmp_path / "results").glob("*/preview.png"))
    assert len(previews) == len(SAMPLES)
    # the private redis-server started by `triage-node up` is gone after the demo stopped
    ps = subprocess.run(["pgrep", "-f", f"redis-server.*{tmp_path}"], capture_output=True, text=True)
    assert ps.stdout.strip() == ""
    status = run("status", "--config", str(tmp_path / "node.toml"), cwd=tmp_path)
    assert status.returncode == 0 and f"sent {len(SAMPLES)}" in status.stdout


def test_demo_says_why_when_the_node_refuses(tmp_path):
    """A node whose spool cannot take the films (here: a free-space reserve no disk meets) refuses every C-STORE;
    the demo ends at once with the node's reason for each film, not after its timeout with "no result yet"."""
    require("Orthanc", "redis-server")
    env = dict(os.environ, TRIAGE_SPOOL_MAX_DISK_USAGE="1.0", TRIAGE_SPOOL_RESERVE_MB=str(2**30))
    if MODEL:
        env["TRIAGE_MODEL_PATH"] = MODEL
    res = subprocess.run([sys.executable, str(ROOT / "deploy" / "demo.py"), "--once", "--workdir", str(tmp_path),
                          "--timeout", "400"], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert "no result yet" not in res.stdout and "missing after" not in res.stdout, res.stdout[-3000:]
    assert res.stdout.count("refused by the node: spool free space") == len(SAMPLES), res.stdout[-3000:]
    assert f"the node refused {len(SAMPLES)} CXR(s)" in res.stdout and "below the 1073741824 MiB reserve" in res.stdout
    assert not list((tmp_path / "spool" / "instances").glob("*")), "nothing refused is kept"
