"""The harmonised input travels with the model package and the worker applies it exactly as training did."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from triage_node.errors import ModelError
from triage_node.inference.classifier import build_classifier
from triage_node.inference.model import CAM, TriageModel, load_model, save_package
from triage_node.inference.preprocess import harmonise, to_batch
from triage_node.inference.prior import LungPrior
from triage_node.inference.types import ModelInfo
from triage_node.training.classifier_train import predict_probs


def _package(tmp_path, method: str, arch: str = "resnet18"):
    torch.manual_seed(0)
    gate = build_classifier(arch).eval()
    info = ModelInfo(name="t", version="0.0.1-test", architecture="test", demo=True)
    tm = TriageModel(None, gate, LungPrior.from_box_stats(), info, threshold=0.5, box_threshold=0.0, input_size=64,
                     gate_size=64, detector_arch=CAM, gate_arch=arch, device="cpu", harmonise=method)
    return save_package(tm, tmp_path / "pkg", weights="fp16")


def test_worker_applies_the_packaged_harmonisation(tmp_path) -> None:
    d = _package(tmp_path, "equalise-blur")
    assert json.loads((d / "model.json").read_text())["preprocess"] == {"harmonise": "equalise-blur",
                                                                       "blur_sigma": 1.0}
    model = load_model(d, device="cpu")
    assert model.harmonise == "equalise-blur"
    img = np.random.default_rng(0).random((300, 260)).astype(np.float32)
    p = model.predict([img], use_gate=False)[0].probability
    x = to_batch([img], 64, torch.device("cpu"))
    with torch.inference_mode():
        want = torch.sigmoid(model.gate(harmonise(x, "equalise-blur"))).item()
        plain = torch.sigmoid(model.gate(x)).item()
    assert p == pytest.approx(want, abs=1e-4) and abs(want - plain) > 1e-4  # the harmonised input, not the plain one
    # training's scoring path (uint8 cache of the same resize) gives the worker's score
    u8 = (x[0, 0].numpy() * 255 + 0.5).astype(np.uint8)[None]
    assert predict_probs(model.gate, u8, method="equalise-blur")[0] == pytest.approx(p, abs=0.02)


def test_a_package_without_preprocess_is_not_harmonised(tmp_path) -> None:
    d = _package(tmp_path, "none", arch="efficientnet_lite0")  # the shipped architecture round-trips too
    assert "preprocess" not in json.loads((d / "model.json").read_text())
    assert load_model(d, device="cpu").harmonise == "none"


def test_unknown_harmonisation_is_refused(tmp_path) -> None:
    d = _package(tmp_path, "equalise")
    cfg = json.loads((d / "model.json").read_text())
    cfg["preprocess"]["harmonise"] = "clahe"
    (d / "model.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="unknown harmonisation 'clahe'"):
        load_model(d, device="cpu")
