"""The report worker's warm-up (workers/warmup.py): one full result set built before the first task."""

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from triage_node import config
from workers import warmup

ROOT = Path(__file__).resolve().parent.parent


def test_build_once_builds_every_configured_output_and_keeps_nothing():
    cfg = config.load()
    before = set(Path(tempfile.gettempdir()).glob("triage-warm-up-*"))
    assert warmup.build_once(cfg) == ["sc", "sr"]  # the default outputs
    with_gsps = dataclasses.replace(cfg, outputs=dataclasses.replace(cfg.outputs, gsps=True))
    assert warmup.build_once(with_gsps) == ["gsps", "sc", "sr"]
    only_sr = dataclasses.replace(cfg, outputs=dataclasses.replace(cfg.outputs, sc=False))
    assert warmup.build_once(only_sr) == ["sr"]
    assert set(Path(tempfile.gettempdir()).glob("triage-warm-up-*")) == before  # its folder is gone


def test_report_warm_up_loads_what_the_first_build_would():
    """In a fresh process: after the report worker's warm-up, the tables of the standard that the first result
    loads lazily are already loaded (else the first CXR after a start pays ~0.7 s of CPU for them)."""
    code = """
import json
from triage_node import config
from triage_node.encoding import sanitize
from highdicom._standard_utils import get_module_attribute_map
from workers import warmup
cfg = config.load()
before = [sanitize._module_types.cache_info().currsize, get_module_attribute_map.cache_info().currsize]
warmup.warm(cfg, {cfg.broker.report_queue})
after = [sanitize._module_types.cache_info().currsize, get_module_attribute_map.cache_info().currsize]
print(json.dumps({"before": before, "after": after}))
"""
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"before": [0, 0], "after": [1, 1]}
