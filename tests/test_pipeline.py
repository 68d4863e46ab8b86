"""Pipeline-level behaviour: a re-run with a new model version links to the earlier SR and never overwrites it;
configured outputs (SR always, SC and GSPS optional)."""

from __future__ import annotations

import shutil
import subprocess

import pydicom
import pytest
from conftest import SAMPLES, require

from triage_node import config, pipeline
from triage_node.inference.types import Detection, ModelInfo, Prediction


def _pred(version: str) -> Prediction:
    return Prediction(0.8, 0.5, (Detection(320, 570, 160, 110, 0.7),), ModelInfo("cxr-test", version), 1024, 1024)


def test_new_model_version_links_predecessor_sr(tmp_path):
    require("dciodvfy")
    cfg = config.Config(outputs=config.OutputConfig(archive_dir=str(tmp_path / "archive")))
    sop = str(pydicom.dcmread(SAMPLES[0], stop_before_pixels=True).SOPInstanceUID)
    first = pipeline.build(SAMPLES[0], _pred("1.0.0"), cfg, tmp_path / "v1")
    (tmp_path / "archive" / sop).mkdir(parents=True)
    for f in first:
        shutil.copy2(f, tmp_path / "archive" / sop / f.name)
    old_sr = pydicom.dcmread(next(f for f in first if f.name.startswith("sr-")))
    second = pipeline.build(SAMPLES[0], _pred("2.0.0"), cfg, tmp_path / "v2")
    new_sr = pydicom.dcmread(next(f for f in second if f.name.startswith("sr-")))
    assert new_sr.SOPInstanceUID != old_sr.SOPInstanceUID
    refs = [r.ReferencedSOPInstanceUID for study in new_sr.PredecessorDocumentsSequence
            for series in study.ReferencedSeriesSequence for r in series.ReferencedSOPSequence]
    assert refs == [old_sr.SOPInstanceUID]
    out = subprocess.run(["dciodvfy", str(next(f for f in second if f.name.startswith("sr-")))],
                         capture_output=True, text=True)
    assert not [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
    # the same version again replaces (same UID) and does not reference itself
    again = pipeline.build(SAMPLES[0], _pred("1.0.0"), cfg, tmp_path / "v1b")
    sr_again = pydicom.dcmread(next(f for f in again if f.name.startswith("sr-")))
    assert sr_again.SOPInstanceUID == old_sr.SOPInstanceUID
    assert "PredecessorDocumentsSequence" not in sr_again


@pytest.mark.parametrize("sc, gsps, expected", [(True, False, ["sc", "sr"]), (False, True, ["gsps", "sr"]),
                                                (True, True, ["gsps", "sc", "sr"]), (False, False, ["sr"])])
def test_outputs_are_configuration_sr_always_on(tmp_path, sc, gsps, expected):
    cfg = config.Config(outputs=config.OutputConfig(sc=sc, gsps=gsps, archive_dir=""))
    files = pipeline.build(SAMPLES[1], _pred("1.0.0"), cfg, tmp_path)
    assert sorted(f.name.split("-")[0] for f in files) == expected
    if gsps:
        require("dcmpschk")
        g = next(f for f in files if f.name.startswith("gsps-"))
        out = subprocess.run(["dcmpschk", str(g)], capture_output=True, text=True)
        assert out.returncode == 0 and "Error" not in out.stdout


def test_model_threads_setting_reaches_torch():
    """``model.threads`` (TRIAGE_MODEL_THREADS) sets the inference process's torch intra-op threads; 0 keeps
    torch's default. Run in fresh interpreters: the setting is process-wide."""
    import subprocess
    import sys

    code = ("import torch; from triage_node import config, pipeline; "
            "d = torch.get_num_threads(); pipeline.get_model(config.load()); print(d, torch.get_num_threads())")
    for value, expect in (("1", lambda d: 1), ("0", lambda d: d)):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**__import__("os").environ, "TRIAGE_MODEL_THREADS": value,
                                  "OMP_NUM_THREADS": "", "TRIAGE_CONFIG": ""}).stdout.split()
        default, now = int(out[0]), int(out[1])
        assert now == expect(default), (value, default, now)
