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
