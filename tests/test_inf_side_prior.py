"""The CAM localiser's side prior (a density atlas of normal films), its packaging, and weight soups."""

import json

import numpy as np
import pytest
import torch

from triage_node.errors import ModelError
from triage_node.inference.classifier import boxes_from_cam, build_classifier
from triage_node.inference.model import ATLAS_FILE, CAM, TriageModel, load_model, save_package
from triage_node.inference.prior import DensityAtlas, LungPrior
from triage_node.inference.types import ModelInfo
from triage_node.training import classifier_train as CT

S = 64


def _sides_reference(atlas: DensityAtlas, x: np.ndarray) -> np.ndarray:
    """``DensityAtlas.sides`` the long way: the box-filtered residual, then its mean over each half of the lungs."""
    t = torch.as_tensor(x, dtype=torch.float32)
    z = atlas.standardise(t, atlas.lung) - torch.from_numpy(atlas.mean)
    z = z / (torch.from_numpy(atlas.sd) + atlas.sd_floor)
    z = torch.nn.functional.avg_pool2d(z[:, None], atlas.smooth, 1, atlas.smooth // 2, count_include_pad=False)[:, 0]
    left = np.zeros_like(atlas.lung)
    left[:, : S // 2] = True
    return torch.stack([z[:, torch.from_numpy(h)].mean(1) for h in (atlas.lung & left, atlas.lung & ~left)],
                       1).numpy()


def _lung() -> np.ndarray:
    heat = np.zeros((64, 64), np.float32)
    heat[8:56, 6:28] = 1.0  # image-left lung field
    heat[8:56, 36:58] = 1.0  # image-right lung field
    return heat


def _normals(n: int = 12, seed: int = 0) -> np.ndarray:
    """Films without a finding: a grey chest, a brighter 'heart' on the image right, per-film exposure and noise."""
    g = np.random.default_rng(seed)
    base = np.full((S, S), 0.3, np.float32)
    base[30:50, 32:44] = 0.7  # the heart shadow is denser on one side in every normal film
    films = []
    for _ in range(n):
        f = base * g.uniform(0.8, 1.2) + g.uniform(-0.05, 0.05) + g.normal(0, 0.02, (S, S)).astype(np.float32)
        films.append(np.clip(f, 0, 1))
    return np.stack(films).astype(np.float32)


def test_atlas_points_at_the_hemithorax_denser_than_normal():
    heat = _lung()
    atlas = DensityAtlas.fit(_normals(), heat)
    film = _normals(1, seed=7)[0]
    # a normal film: the heart is in the atlas, so neither side stands out much
    base = atlas.sides(film[None])[0]
    assert abs(base[0] - base[1]) < 0.5
    left = film.copy()
    left[34:50, 8:24] += 0.25  # consolidation low in the image-left lung
    sl = atlas.sides(torch.from_numpy(left)[None, None])[0]  # N x 1 x S x S tensors too
    assert sl[0] > sl[1] + 0.5
    right = film.copy()
    right[12:28, 40:56] += 0.25
    sr = atlas.sides(right[None])[0]
    assert sr[1] > sr[0] + 0.5
    # brightness and contrast of the whole film do not decide the side (each film is standardised in its lungs)
    assert np.allclose(atlas.sides((0.5 * left + 0.2)[None]), sl[None], atol=1e-3)
    # the fast path (one weighted sum per half) equals the box filter then the mean over each half
    many = np.random.default_rng(5).random((6, S, S), dtype=np.float32)
    assert np.allclose(atlas.sides(many), _sides_reference(atlas, many), atol=1e-4)
    assert np.allclose(atlas.sides(left[None]), _sides_reference(atlas, left[None]), atol=1e-4)
    with pytest.raises(ValueError, match="64 px"):
        atlas.sides(np.zeros((1, 32, 32), np.float32))
    with pytest.raises(ValueError, match="at least 2 films"):
        DensityAtlas.fit(_normals(1), heat)


def test_boxes_from_cam_keep_to_the_chosen_half():
    lung = np.zeros((64, 64), np.float32)
    lung[8:56, 4:60] = 1.0
    cam = np.zeros((8, 8), np.float32)
    cam[3, 6] = 9.0  # hottest: image right
    cam[5, 1] = 4.0  # weaker: image left
    free, _ = boxes_from_cam(cam, lung)
    assert free[0][0] >= 0.5  # without a side, the hottest region
    left, scores = boxes_from_cam(cam, lung, half="left")
    assert len(left) and (left[:, 2] <= 0.5 + 1e-6).all() and scores[0] == pytest.approx(1.0)
    right, _ = boxes_from_cam(cam, lung, half="right")
    assert (right[:, 0] >= 0.5 - 1e-6).all()
    with pytest.raises(ValueError, match="half"):
        boxes_from_cam(cam, lung, half="middle")


def _model(atlas: DensityAtlas | None) -> TriageModel:
    torch.manual_seed(0)
    info = ModelInfo(name="side-test", version="0.0.1-test", demo=True)
    return TriageModel(None, build_classifier("resnet18"), LungPrior(_lung(), 0.3), info, threshold=0.5,
                       box_threshold=0.0, input_size=S, gate_size=S, detector_arch=CAM, gate_arch="resnet18",
                       device="cpu", atlas=atlas)


def test_package_round_trip_and_a_broken_atlas_is_refused(tmp_path):
    atlas = DensityAtlas.fit(_normals(), _lung(), source="test normals")
    d = save_package(_model(atlas), tmp_path / "pkg")
    cfg = json.loads((d / "model.json").read_text())
    assert cfg["localiser"]["side"] == "density" and cfg["localiser"]["atlas"]["films"] == 12
    assert ATLAS_FILE in cfg["files"]
    m = load_model(d, device="cpu")
    assert m.atlas is not None and np.array_equal(m.atlas.mean, atlas.mean) and np.array_equal(m.atlas.sd, atlas.sd)
    film = _normals(1, seed=3)[0]
    film[34:50, 8:24] += 0.3
    raw = m.analyze([film], run_detector=True)[0]
    assert len(raw.boxes) and (raw.boxes[:, 2] <= S / 2 + 1e-3).all()  # every box in the denser (image-left) half
    # the same weights without the atlas may put boxes anywhere; rewriting without it removes the stale file
    save_package(_model(None), tmp_path / "pkg")
    assert not (d / ATLAS_FILE).exists() and "side" not in json.loads((d / "model.json").read_text())["localiser"]
    save_package(_model(atlas), tmp_path / "pkg")
    with open(d / ATLAS_FILE, "r+b") as f:  # one flipped byte
        f.seek(200)
        b = f.read(1)
        f.seek(200)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(ModelError, match="checksum mismatch for atlas.safetensors"):
        load_model(d, device="cpu")
    save_package(_model(atlas), tmp_path / "pkg")
    cfg = json.loads((d / "model.json").read_text())
    del cfg["files"][ATLAS_FILE]
    (d / "model.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="lists no checksum for atlas.safetensors"):
        load_model(d, device="cpu")
    cfg["localiser"]["side"] = "telepathy"
    (d / "model.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="unknown localiser side prior"):
        load_model(d, device="cpu")
    with pytest.raises(ModelError, match="input size"):
        TriageModel(None, build_classifier("resnet18"), LungPrior(_lung()), ModelInfo("x", "0"), input_size=32,
                    gate_size=32, detector_arch=CAM, gate_arch="resnet18", device="cpu", atlas=atlas)


def test_weight_soup_is_the_mean_of_the_runs(tmp_path):
    torch.manual_seed(1)
    a, b = build_classifier("resnet18").state_dict(), build_classifier("resnet18").state_dict()
    b = {k: (v + 1.0 if v.is_floating_point() else v + 5) for k, v in b.items()}
    torch.save(a, tmp_path / "a.pt")
    torch.save({"state": {"best_state": b}, "model": a}, tmp_path / "b.pt")  # a checkpoint: its best state counts
    m = CT.soup("resnet18", [str(tmp_path / "a.pt"), str(tmp_path / "b.pt")])
    sd = m.state_dict()
    w = "trunk.0.weight"
    assert torch.allclose(sd[w], (a[w] + b[w]) / 2)
    assert torch.allclose(sd["trunk.1.running_var"], (a["trunk.1.running_var"] + b["trunk.1.running_var"]) / 2)
    assert sd["trunk.1.num_batches_tracked"] == a["trunk.1.num_batches_tracked"]  # integers: the first run's
    assert not m.training
    torch.save({k: v for k, v in a.items() if k != w}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="not the same architecture"):
        CT.soup("resnet18", [str(tmp_path / "a.pt"), str(tmp_path / "c.pt")])


def test_atlas_films_are_the_training_negatives_and_too_few_leave_the_prior_out(tmp_path, caplog):
    from pathlib import Path

    from triage_node.training.images import Source

    paths = [Path(f"/x/{i}.dcm") for i in range(5)]
    src = Source("nih", tmp_path / "l.csv", 1.0, paths, np.array([1, 0, 1, 0, 0]), ["a"] * 5, [""] * 5,
                 [p.stem for p in paths])
    assert CT.atlas_films(src, "density") == [paths[1], paths[3], paths[4]]
    assert CT.atlas_films(src, "none") is None
    one = Source("nih", tmp_path / "l.csv", 1.0, paths[:2], np.array([1, 0]), ["a"] * 2, [""] * 2, ["0", "1"])
    assert CT.atlas_films(one, "density") is None
    assert "side prior left out" in caplog.text
