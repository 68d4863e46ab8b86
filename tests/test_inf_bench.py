"""Benchmark scripts run (GPU bench in its CPU smoke mode); the JPEG frame decode path matches pydicom."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from triage_node.inference.preprocess import decode_jpeg_frames_gpu, frames_from_dicom, percentile_window

ROOT = Path(__file__).resolve().parent.parent
RSNA = ROOT / "sample_dicom"  # five real RSNA files shipped with the repo (labels.csv beside them)


@pytest.mark.parametrize("model", ["untrained", "models/demo"])
def test_gpu_bench_smoke_mode_runs(model):
    """The GPU benchmark's code path on CPU, with the untrained detector package and with the shipped package (a
    class-activation-map classifier without a detector: the baseline is then the plain classifier network)."""
    r = subprocess.run([sys.executable, "bench/gpu_infer.py", "--smoke", "--model", model], cwd=ROOT,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ours end-to-end" in r.stdout and "torchvision eager" in r.stdout
    if model == "models/demo":
        assert "classifier only" in r.stdout


def test_jpeg_frame_decode_matches_pydicom():
    files = sorted(RSNA.glob("*.dcm"))[:2]
    x = decode_jpeg_frames_gpu([frames_from_dicom(p) for p in files], device="cpu", window=False)
    assert x.shape == (2, 1, 1024, 1024)
    for i, p in enumerate(files):
        ref = pydicom.dcmread(p).pixel_array.astype(np.float32) / 255
        assert np.abs(x[i, 0].numpy() - ref).mean() < 1.5 / 255
    w = percentile_window(x)
    assert float(w.min()) == 0.0 and float(w.max()) == 1.0


def test_percentile_window_matches_cpu_path():
    from triage_node.training.data import window

    a = np.random.default_rng(0).integers(20, 200, (64, 64)).astype(np.float32)
    got = percentile_window(torch.from_numpy(a)[None, None], stride=1)[0, 0].numpy()
    np.testing.assert_allclose(got, window(a), atol=2e-3)
