"""TriageModel.predict contract, gate and lung prior behaviour, evaluation report on the real RSNA samples."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import real_data
from torch import nn

from triage_node.inference.model import untrained_model
from triage_node.inference.prior import LungPrior
from triage_node.inference.types import Prediction
from triage_node.training import evaluate_boxes as evaluate

ROOT = Path(__file__).resolve().parent.parent
RSNA = ROOT / "sample_dicom"  # five real RSNA files shipped with the repo (labels.csv beside them)


class FixedDetector(nn.Module):
    """Returns the same boxes (in network-input pixels) for every image."""

    def __init__(self, boxes, scores):
        super().__init__()
        self.boxes, self.scores = torch.tensor(boxes, dtype=torch.float32), torch.tensor(scores)

    def forward(self, images):
        return [{"boxes": self.boxes.clone(), "scores": self.scores.clone(),
                 "labels": torch.ones(len(self.scores), dtype=torch.int64)} for _ in images]


class FixedGate(nn.Module):
    def __init__(self, logit):
        super().__init__()
        self.logit = logit

    def forward(self, x):
        return torch.full((x.shape[0],), float(self.logit))


LUNG = [100.0, 150.0, 220.0, 330.0]  # right lung region of a 512 input (xyxy)
CORNER = [0.0, 0.0, 40.0, 40.0]  # top-left corner, where no RSNA box lies


@pytest.fixture
def model():
    m = untrained_model(device="cpu", input_size=512)
    m.detector = FixedDetector([LUNG, CORNER], [0.9, 0.8])
    m.box_threshold = 0.3
    return m


def test_predict_contract_sizes_and_source_coordinates(model):
    model.gate = FixedGate(3.0)
    imgs = [np.full((1024, 1024), 0.5, np.float32), np.zeros((2500, 2048), np.float32)]
    preds = model.predict(imgs, use_prior=False)
    assert len(preds) == 2 and all(isinstance(p, Prediction) for p in preds)
    assert (preds[1].rows, preds[1].columns) == (2500, 2048)
    d = max(preds[1].detections, key=lambda d: d.score)
    assert d.x == pytest.approx(100 * 2048 / 512) and d.y == pytest.approx(150 * 2500 / 512)
    assert d.width == pytest.approx(120 * 2048 / 512) and d.height == pytest.approx(180 * 2500 / 512)
    assert preds[0].detections[0].x == pytest.approx(200)
    assert {"preprocess", "gate", "detector", "total"} <= set(preds[0].timings_ms)
    assert preds[0].probability == pytest.approx(1 / (1 + np.exp(-3)), abs=1e-5) and preds[0].positive
    assert Prediction.from_json(json.loads(json.dumps(preds[0].to_json()))) == preds[0]


def test_gate_below_threshold_emits_no_boxes(model):
    img = [np.full((600, 600), 0.5, np.float32)]
    model.gate = FixedGate(-3.0)
    p = model.predict(img)[0]
    assert p.probability < model.threshold and not p.positive and p.detections == ()
    assert len(model.predict(img, use_gate=False)[0].detections) > 0  # the detector did find boxes
    model.gate = FixedGate(3.0)
    assert len(model.predict(img)[0].detections) > 0


def test_prior_suppresses_box_outside_lungs(model):
    model.gate = FixedGate(3.0)
    img = [np.full((1024, 1024), 0.5, np.float32)]
    without = model.predict(img, use_prior=False)[0].detections
    with_prior = model.predict(img, use_prior=True)[0].detections
    assert len(without) == 2 and len(with_prior) == 1
    assert with_prior[0].x == pytest.approx(200)  # the lung box survived, the corner box did not


def test_prior_means():
    prior = LungPrior.from_box_stats(min_mean=0.15)
    means = prior.box_means(np.array([[200, 300, 440, 660], [0, 0, 80, 80], [0, 900, 1024, 1024]]), 1024, 1024)
    assert means[0] > 0.4 and means[1] < 0.05 and means[2] < 0.15
    keep, _ = prior.apply(means, np.array([0.9, 0.9, 0.9]))
    assert keep.tolist() == [True, False, False]


def test_untrained_model_identity():
    m = untrained_model()
    assert "UNTRAINED" in m.info.name and m.info.demo
    p = m.predict([np.random.default_rng(0).random((256, 256), dtype=np.float32)])[0]
    assert 0.0 <= p.probability <= 1.0


def test_evaluate_on_real_rsna_samples_writes_report(tmp_path):
    args = evaluate.get_args_parser().parse_args(
        ["--model", "untrained", "--labels", str(RSNA / "labels.csv"), "--images", str(RSNA), "--out", str(tmp_path)])
    assert evaluate.main(args) == 0
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["n_images"] == 5 and rep["n_positive"] == 3 and rep["n_boxes"] == 6
    for k in ("rsna_metric", "map50", "image_auc", "sensitivity", "specificity", "threshold", "ablation"):
        assert k in rep
    assert 0.0 <= rep["rsna_metric"] <= 1.0
    assert set(rep["ablation"]) == {"detector", "detector+gate", "detector+prior", "detector+gate+prior"}
    assert (tmp_path / "pr_curve.png").stat().st_size > 1000


def test_evaluate_image_level(tmp_path):
    kp = real_data("kermany", "val", "labels.csv")
    args = evaluate.get_args_parser().parse_args(["--model", "untrained", "--image-labels", str(kp),
                                                  "--out", str(tmp_path)])
    assert evaluate.main(args) == 0
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["n_images"] == 12 and 0.0 <= rep["image_auc"] <= 1.0 and "sensitivity" in rep
