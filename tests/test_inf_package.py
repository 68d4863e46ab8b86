"""Model packages: round trip, checksum verification, clear errors; the shipped demo package."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from triage_node.errors import ModelError
from triage_node.inference.model import load_model, save_package, untrained_model

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo"
RSNA = ROOT / "sample_dicom"  # five real RSNA files shipped with the repo (labels.csv beside them)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    m = untrained_model(seed=3, input_size=256)
    m.threshold, m.box_threshold = 0.37, 0.25
    d = save_package(m, tmp_path_factory.mktemp("pkg") / "m", extra={"metrics": {"x": 1}}, card="# card\n")
    return m, d


def test_round_trip(package):
    m, d = package
    cfg = json.loads((d / "model.json").read_text())
    assert cfg["intended_use"].startswith("untrained") and "not for clinical use" in cfg["intended_use"]
    assert set(cfg["files"]) == {"detector.safetensors", "gate.safetensors", "prior.safetensors"}
    assert all(len(v["sha256"]) == 64 for v in cfg["files"].values())
    assert cfg["thresholds"]["gate"] == 0.37 and cfg["thresholds"]["box_score"] == 0.25
    assert "min_mean" in cfg["thresholds"]["prior"] and cfg["input_size"] == 256
    m2 = load_model(d, device="cpu")
    assert m2.threshold == pytest.approx(0.37) and m2.box_threshold == pytest.approx(0.25)
    assert m2.info.name == m.info.name and m2.info.demo
    img = np.random.default_rng(0).random((300, 280), dtype=np.float32)
    r1, r2 = m.analyze([img])[0], m2.analyze([img])[0]
    assert r2.probability == pytest.approx(r1.probability, abs=2e-3)  # fp16 storage


@pytest.mark.parametrize("name", ["detector.safetensors", "gate.safetensors", "prior.safetensors"])
def test_tampered_byte_is_rejected(package, tmp_path, name):
    _, d = package
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    p = bad / name
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="checksum mismatch"):
        load_model(bad)


def test_missing_and_bad_json(package, tmp_path):
    _, d = package
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nope")
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    (bad / "model.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_model(bad)
    (bad / "model.json").write_text(json.dumps({"format": 1}))
    with pytest.raises(ModelError, match="lacks"):
        load_model(bad)
    shutil.rmtree(bad)
    shutil.copytree(d, bad)
    (bad / "gate.safetensors").unlink()
    with pytest.raises(ModelError, match="missing"):
        load_model(bad)


def test_shipped_demo_package():
    cfg = json.loads((DEMO / "model.json").read_text())
    assert cfg["demo"] is True and cfg["intended_use"] == "demo model, not for clinical use"
    assert (DEMO / "MODEL_CARD.md").is_file()
    assert sum(p.stat().st_size for p in DEMO.iterdir()) <= 25 * 1024 * 1024
    m = load_model(DEMO, device="cpu")
    assert m.info.version.endswith("-demo") and "NOT FOR CLINICAL USE" in m.info.label
    assert 0.0 < m.threshold < 1.0
    # 0.5.0: harmonised inputs (one preprocessing for both gates), and the shortcut probe on the network's inputs of
    # the confounded pool at or under the 0.60, stored beside the training record
    assert m.harmonise == "equalise-blur" and m.gate_arch == "efficientnet_lite0"
    probe = cfg["shortcut_probe"]
    assert probe["harmonise"] == "equalise-blur" and probe["inputs"]["nih_adult"]["auc"] <= 0.60
    assert probe["raw"]["nih_adult"]["auc"] > 0.9  # what the harmonisation took away


def test_cam_package_round_trip(tmp_path):
    """A classifier + class-activation-map package: no detector file, same outputs after the round trip."""
    import torch

    from triage_node.inference.classifier import build_classifier
    from triage_node.inference.model import CAM, TriageModel
    from triage_node.inference.prior import LungPrior
    from triage_node.inference.types import ModelInfo

    torch.manual_seed(0)
    info = ModelInfo(name="cam-test", version="0.0.1-test", demo=True)
    m = TriageModel(None, build_classifier("resnet18"), LungPrior.from_box_stats(min_mean=0.3), info, threshold=0.0,
                    box_threshold=0.0, input_size=128, gate_size=128, detector_arch=CAM, gate_arch="resnet18",
                    device="cpu", tta=True)
    d = save_package(m, tmp_path / "cam")
    cfg = json.loads((d / "model.json").read_text())
    assert set(cfg["files"]) == {"gate.safetensors", "prior.safetensors"} and cfg["tta"] == ["hflip"]
    m2 = load_model(d, device="cpu")
    assert m2.detector is None and m2.tta
    img = np.random.default_rng(1).random((400, 300), dtype=np.float32)
    p1, p2 = m.predict([img])[0], m2.predict([img])[0]
    assert p2.probability == pytest.approx(p1.probability, abs=2e-3)
    assert len(p1.detections) >= 1  # threshold 0: the map always yields its peak region
    for det in p2.detections:  # boxes in source pixels, inside the image
        assert 0 <= det.x and det.x + det.width <= 300 + 1e-3 and det.y + det.height <= 400 + 1e-3


def test_shipped_demo_model_has_skill_on_held_out_real_films():
    """The shipped model on the films of its own held-out test splits (never trained on, 256 px copies): on the
    clean NIH films (another source) it must rank opacities above chance (card: 0.644 at 1024 px; 0.648 here; chance
    would pass 0.60 about once in 20), on the confounded same-source films as the card says (0.827; 0.831 here),
    and put its top box on the expert's box."""
    from conftest import real_data

    from triage_node.training import evaluate as E
    from triage_node.training.data import load_image
    from triage_node.training.images import read_boxes, read_source

    split = json.loads((DEMO / "split.json").read_text())
    src = read_source(str(real_data("nih", "labels.csv")))
    test_keys = set(split["nih_adult"]["test"])
    idx = [i for i, k in enumerate(src.keys) if k in test_keys]
    assert len(idx) == len(test_keys) >= 80
    m = load_model(DEMO, device="cpu")
    raws = m.analyze([load_image(src.paths[i]) for i in idx])
    y = src.labels[idx]
    p = np.array([r.probability for r in raws])
    from triage_node.inference.gate import roc_auc

    assert roc_auc(y, p) >= 0.78
    clean = set(split["nih_clean"]["test"])
    ci = [i for i, k in enumerate(src.keys) if k in clean]
    assert len(ci) == len(clean) >= 100
    pc = np.array([r.probability for r in m.analyze([load_image(src.paths[i]) for i in ci])])
    assert roc_auc(src.labels[ci], pc) >= 0.60
    boxes = read_boxes(real_data("nih", "boxes.csv"))
    tops, gts = [], []
    for i, r in zip(idx, raws):
        if src.keys[i] in boxes:
            d = m.postprocess(r, use_gate=False).detections
            tops.append(np.array([d[0].x, d[0].y, d[0].width, d[0].height]) if d else None)
            gts.append(boxes[src.keys[i]])
    loc = E.localisation(tops, gts)
    # measured 18/26 = 0.69 with 0.3.1's density side prior (0.3.0 without it: 12/26 = 0.46); target 0.70
    assert loc["boxed_films"] == 26 and loc["top_box_iobb_0.1"] >= 0.6
    assert m.atlas is not None  # the side prior ships with the demo model


def test_shipped_demo_model_routes_children_to_its_pediatric_gate():
    """0.4.0: films of patients under 6 go through the pediatric gate (0.3.1's, Kermany-trained). On held-out
    Kermany films (the package's own test groups) it must rank pneumonia well, and far better than the adult gate,
    which never saw a child (model card: AUC 0.98 vs 0.52 on all 773). The package stays within 25 MB."""
    from conftest import real_data

    from triage_node.inference.gate import roc_auc
    from triage_node.training.data import load_image
    from triage_node.training.images import read_source

    assert sum(f.stat().st_size for f in DEMO.glob("*.safetensors")) <= 25_000_000
    m = load_model(DEMO, device="cpu")
    assert m.pediatric is not None and m.pediatric.gate is not None and m.pediatric.max_age_years == 6.0
    test_keys = set(json.loads((DEMO / "split.json").read_text())["kermany_224"]["test"])
    src = read_source(str(real_data("kermany", "labels.csv")))
    idx = [i for i, k in enumerate(src.keys) if k in test_keys]
    pos = [i for i in idx if src.labels[i] == 1][:40]
    neg = [i for i in idx if src.labels[i] == 0][:40]
    films = [load_image(src.paths[i]) for i in pos + neg]
    y = np.array([1] * len(pos) + [0] * len(neg))
    child = np.array([r.probability for r in m.analyze(films, ages=[3.0] * len(films))])
    adult = np.array([r.probability for r in m.analyze(films, ages=[40.0] * len(films))])
    assert roc_auc(y, child) >= 0.9
    assert roc_auc(y, child) - roc_auc(y, adult) >= 0.2
