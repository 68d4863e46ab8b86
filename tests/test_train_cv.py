"""k-fold cross-validation of the classifier (train --cv, cv-report) on real NIH films."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import nih_subset_csv, real_data

from triage_node.training import classifier_train as CT
from triage_node.training import cv_report as CV
from triage_node.training import images as I

ROOT = Path(__file__).resolve().parent.parent


def test_folds_partition_the_pool_by_patient_and_leave_test_alone():
    src = I.read_source(str(real_data("nih", "pool", "labels.csv")))
    boxed = set(I.read_boxes(real_data("nih", "pool", "boxes.csv")))
    force = {g for g, k in zip(src.groups, src.keys) if k in boxed}
    tr, va, te = I.group_split(src.groups, (0.15, 0.15), 0, force)
    pool = set(tr) | set(va)
    vals = []
    for fold in range(4):
        a, b = CT.cv_split(src.groups, tr, va, f"4:{fold}", 0)
        assert set(a) | set(b) == pool and not set(a) & set(b)  # the test split is never touched
        assert not {src.groups[i] for i in a} & {src.groups[i] for i in b}  # no patient on both sides
        assert 0.15 < len(b) / len(pool) < 0.35
        vals.append(set(b))
    assert set().union(*vals) == pool and sum(map(len, vals)) == len(pool)  # each film validated exactly once
    a, b = CT.cv_split(src.groups, tr, va, "4:all", 0)
    assert set(a) == pool and len(b) == 0
    # the folds depend on the groups, not on row order
    groups = [src.groups[i] for i in sorted(pool)]
    perm = np.random.default_rng(1).permutation(len(groups))
    f1, f2 = I.cv_folds(groups, 4, 0), I.cv_folds([groups[i] for i in perm], 4, 0)
    assert all(f1[perm[j]] == f2[j] for j in range(len(groups)))
    for bad in ("4", "1:0", "4:4", "x:1", "4:-1"):
        with pytest.raises(ValueError):
            CT.parse_cv(bad)
    with pytest.raises(ValueError, match="cannot fill"):
        I.cv_folds(["a", "b"], 3)


def _fold(run: Path, k: int, fold: int, keys: list[str], scores: list[list[float]], best: int,
          pool: tuple[str, ...] = ("a", "b", "c", "d")) -> Path:
    run.mkdir(parents=True)
    (run / "split.json").write_text(json.dumps({"src": {"train": [p for p in pool if p not in keys], "val": keys,
                                                        "test": ["t"], "cv": f"{k}:{fold}", "epochs": 3}}))
    (run / "summary.json").write_text(json.dumps({"best_epoch": best, "history": [
        {"epoch": e + 1, "val_p": s} for e, s in enumerate(scores)]}))
    return run


def test_cv_report_rule_on_a_hand_worked_case(tmp_path):
    labels = {"a": 1, "b": 0, "c": 1, "d": 0}
    views = {"a": "PA", "b": "PA", "c": "AP", "d": "AP"}
    # fold 0 (a, b): epoch 1 wrong way round, epoch 2 right; fold 1 (c, d): right at both epochs, 3 epochs run
    f0 = CV.read_fold(_fold(tmp_path / "f0", 2, 0, ["a", "b"], [[0.2, 0.8], [0.9, 0.1]], best=2))
    f1 = CV.read_fold(_fold(tmp_path / "f1", 2, 1, ["c", "d"], [[0.7, 0.6], [0.6, 0.5], [0.2, 0.9]], best=3))
    rep = CV.report([f0, f1], labels, views, target=0.9)
    assert rep["epochs_reached"] == [2, 3] and [c["mean_fold_auc"] for c in rep["curve"]] == [0.5, 1.0]
    assert rep["chosen_epoch"] == 2  # only the epochs every fold reached count
    assert rep["at_chosen_epoch"]["auc"] == pytest.approx(1.0)  # pooled: 0.9, 0.6 above 0.1, 0.5
    assert rep["at_chosen_epoch"]["by_view"] == {"AP": {"n": 2, "auc": 1.0}, "PA": {"n": 2, "auc": 1.0}}
    # sensitivity 0.9 of 2 positives needs both: threshold between the lower positive (0.6) and the next score
    assert 0.5 < rep["operating_point"]["threshold"] <= 0.6
    assert rep["operating_point"]["sensitivity"] == 1.0 and rep["operating_point"]["specificity"] == 1.0
    assert rep["at_each_folds_best_epoch"]["epochs"] == [2, 3]
    # positives 0.9, 0.2 against negatives 0.1, 0.9: (1 + 0.5 + 1 + 0) / 4
    assert rep["at_each_folds_best_epoch"]["auc"] == pytest.approx(0.625)
    assert rep["at_last_common_epoch"]["epoch"] == 2
    # a film validated by two runs, or runs of different cross-validations, are refused
    dup = CV.read_fold(_fold(tmp_path / "dup", 2, 1, ["b", "c"], [[0.1, 0.2]], best=1))
    with pytest.raises(SystemExit, match="validated by two runs"):
        CV.report([f0, dup], labels, views, 0.9)
    other = CV.read_fold(_fold(tmp_path / "k3", 3, 1, ["c"], [[0.1]], best=1))
    with pytest.raises(SystemExit, match="not folds of one"):
        CV.report([f0, other], labels, views, 0.9)
    with pytest.raises(SystemExit, match="not a finished training run"):
        CV.read_fold(tmp_path / "nothing")
    # folds of another split of the pool (another seed or fractions) are refused
    moved = CV.read_fold(_fold(tmp_path / "moved", 2, 1, ["c", "d"], [[0.1, 0.2]], best=1, pool=("b", "c", "d")))
    with pytest.raises(SystemExit, match="differ in their pool"):
        CV.report([f0, moved], labels, views, 0.9)
    # a fold that validates one class only has no AUC: refused, not silently "epoch 1"
    one = CV.read_fold(_fold(tmp_path / "one", 2, 1, ["c", "d"], [[0.1, 0.2]], best=1))
    with pytest.raises(SystemExit, match="one class only"):
        CV.report([f0, one], {**labels, "c": 0}, views, 0.9)
    # a missing fold is reported
    alone = CV.report([f0], labels, views, 0.9)
    assert alone["folds_present"] == [0] and "only folds [0] of 2" in alone["warnings"][0]
    # under the default rule (the last common epoch), folds that ran different numbers of epochs are flagged
    assert rep["epoch_rule"] == "last" and any("ran [2, 3] epochs" in w for w in rep["warnings"])
    assert rep["fold_of"] == {"a": 0, "b": 0, "c": 1, "d": 1}


def test_cv_report_epoch_rules_and_the_pooling_warning(tmp_path):
    labels = {"a": 1, "b": 0, "c": 1, "d": 0}
    # epoch 2: each fold ranks its pair right (mean per fold 1.0), but fold 1's scores sit far below fold 0's, so
    # pooled: positives 0.9, 0.3 against negatives 0.8, 0.2 -> 3 of 4 pairs, 0.75. Epoch 3: fold 1 wrong (mean 0.5),
    # pooled positives 0.9, 0.2 against 0.1, 0.3 -> 0.75.
    f0 = CV.read_fold(_fold(tmp_path / "f0", 2, 0, ["a", "b"], [[0.2, 0.8], [0.9, 0.8], [0.9, 0.1]], best=2))
    f1 = CV.read_fold(_fold(tmp_path / "f1", 2, 1, ["c", "d"], [[0.5, 0.5], [0.3, 0.2], [0.2, 0.3]], best=2))
    best = CV.report([f0, f1], labels, {}, 0.9, epoch_rule="best-mean")
    assert best["chosen_epoch"] == 2 and best["at_chosen_epoch"]["mean_fold_auc"] == 1.0
    assert best["at_chosen_epoch"]["auc"] == pytest.approx(0.75) and best["at_chosen_epoch"]["fold_aucs"] == [1.0, 1.0]
    assert best["epoch_rule"] == "best-mean" and best["rule"].startswith("epoch: highest mean per-fold")
    assert any("pooled AUC (0.750) is 0.250 below the mean per-fold AUC (1.000)" in w for w in best["warnings"])
    last = CV.report([f0, f1], labels, {}, 0.9)  # the default: the schedule's end, chosen without the scores
    assert last["chosen_epoch"] == 3 and last["at_chosen_epoch"]["mean_fold_auc"] == 0.5
    assert last["at_chosen_epoch"]["auc"] == pytest.approx(0.75) and last["warnings"] == []
    assert last["rule"].startswith("epoch: the last epoch every fold reached")
    with pytest.raises(ValueError, match="unknown epoch rule"):
        CV.report([f0, f1], labels, {}, 0.9, epoch_rule="best-pooled")


def test_cv_report_compare_mean_per_fold_is_stratified_by_fold():
    labels = {"a": 1, "b": 0, "c": 1, "d": 0}
    folds = {"a": 0, "b": 0, "c": 1, "d": 1}
    # "better" ranks both folds right on different scales (pooled 0.75, per fold 1.0 and 1.0); "worse" ranks fold 0
    # wrong (pooled: 0.8, 0.3 against 0.9, 0.2 -> 0.5; per fold 0.0 and 1.0 -> 0.5)
    better = {"out_of_fold": {"a": 0.9, "b": 0.8, "c": 0.3, "d": 0.2}, "fold_of": folds, "epoch_rule": "last"}
    worse = {"out_of_fold": {"a": 0.8, "b": 0.9, "c": 0.3, "d": 0.2}, "fold_of": folds}
    d = CV.compare(better, worse, labels)
    assert d["difference"] == pytest.approx(0.25) and d["mean_fold"]["difference"] == pytest.approx(0.5)
    # one film of each class per fold: every resample draws the same films, so the CI is the point itself
    assert d["mean_fold"]["ci95_low"] == pytest.approx(0.5) == d["mean_fold"]["ci95_high"]
    assert d["mean_fold"]["folds"] == 2 and d["epoch_rules"] == ["last", "best-mean"]  # older reports: best-mean
    assert "mean_fold" not in CV.compare(better, {"out_of_fold": worse["out_of_fold"]}, labels)  # an older report
    with pytest.raises(SystemExit, match="different folds"):
        CV.compare(better, worse | {"fold_of": {"a": 0, "b": 1, "c": 1, "d": 0}}, labels)
    # the mean-fold CI is a real bootstrap on a larger case: it contains the point and is not degenerate
    rng = np.random.default_rng(0)
    keys = [f"k{i}" for i in range(80)]
    y = {k: i % 2 for i, k in enumerate(keys)}
    fo = {k: (i // 2) % 4 for i, k in enumerate(keys)}
    a = {k: float(y[k] + rng.normal(0, 0.8) + fo[k]) for k in keys}  # fold-dependent offsets: pooling suffers
    b = {k: float(y[k] + rng.normal(0, 1.6)) for k in keys}
    big = CV.compare({"out_of_fold": a, "fold_of": fo}, {"out_of_fold": b, "fold_of": fo}, y)["mean_fold"]
    assert big["ci95_low"] < big["difference"] < big["ci95_high"] and big["ci95_high"] - big["ci95_low"] > 0.05


def test_cv_report_compare_is_paired_on_the_same_films():
    labels = {"a": 1, "b": 0, "c": 1, "d": 0}
    better = {"out_of_fold": {"a": 0.9, "b": 0.1, "c": 0.8, "d": 0.2}, "runs": ["x"], "chosen_epoch": 3}
    worse = {"out_of_fold": {"a": 0.9, "b": 0.95, "c": 0.8, "d": 0.2}, "runs": ["y"], "chosen_epoch": 5}
    d = CV.compare(better, worse, labels)
    # AUC 1.0 vs 0.5 (b beats both positives in "worse"): +0.5, reported against the other's epoch
    assert d["difference"] == pytest.approx(0.5) and d["n"] == 4 and d["other_chosen_epoch"] == 5
    assert CV.compare(worse, better, labels)["difference"] == pytest.approx(-0.5)
    assert CV.compare(better, better, labels)["difference"] == 0.0
    with pytest.raises(SystemExit, match="different films"):
        CV.compare(better, {"out_of_fold": {"a": 0.9, "b": 0.1, "c": 0.8}}, labels)


def test_cv_report_compare_within_each_view():
    # AP: better ranks its pair right, worse wrong; PA: both rank right. Overall and per view, hand-worked.
    labels = {"a": 1, "b": 0, "c": 1, "d": 0, "e": 1, "f": 0}
    views = {"a": "AP", "b": "AP", "c": "AP", "d": "AP", "e": "PA", "f": "PA"}
    better = {"out_of_fold": {"a": 0.9, "b": 0.1, "c": 0.8, "d": 0.2, "e": 0.7, "f": 0.3}}
    worse = {"out_of_fold": {"a": 0.1, "b": 0.9, "c": 0.2, "d": 0.8, "e": 0.7, "f": 0.3}}
    d = CV.compare(better, worse, labels, views=views)
    assert d["by_view"]["AP"]["difference"] == pytest.approx(1.0) and d["by_view"]["AP"]["n"] == 4
    assert d["by_view"]["PA"]["difference"] == 0.0 and d["by_view"]["PA"]["n"] == 2
    assert "by_view" not in CV.compare(better, worse, labels)  # no views given: overall only
    # a view whose films are all of one class has no AUC: left out rather than reported as a number
    one_class = dict(views, e="LL")
    assert set(CV.compare(better, worse, labels, views=one_class | {"f": "XX"})["by_view"]) == {"AP"}


def test_view_label_balance_gives_each_cell_the_same_weight():
    src = I.Source("s", Path("x.csv"), 1.0, [Path(str(i)) for i in range(7)], np.array([1, 1, 1, 0, 1, 0, 0]),
                   [str(i) for i in range(7)], ["AP", "AP", "AP", "AP", "PA", "PA", ""], [str(i) for i in range(7)])
    w = CT.balance_weights(src, "view-label")
    assert w.mean() == pytest.approx(1.0)
    cells: dict = {}
    for v, y, x in zip(src.views, src.labels, w):
        cells[(v, int(y))] = cells.get((v, int(y)), 0.0) + float(x)
    assert len(cells) == 5 and max(cells.values()) == pytest.approx(min(cells.values()))  # ("", 0) is a cell too
    assert w[0] == pytest.approx(w[1]) and w[3] == pytest.approx(3 * w[0])  # 3 AP positives vs 1 AP negative
    assert (CT.balance_weights(src, "none") == 1).all()
    with pytest.raises(ValueError, match="unknown balance"):
        CT.balance_weights(src, "label")
    # on the real NIH pool the view is confounded with the label; balanced, the view no longer predicts it
    nih = I.read_source(str(real_data("nih", "pool", "labels.csv")))
    wn = CT.balance_weights(nih, "view-label")
    views, y = np.array(nih.views), nih.labels.astype(bool)
    raw = [y[views == v].mean() for v in ("AP", "PA")]
    weighted = [wn[(views == v) & y].sum() / wn[views == v].sum() for v in ("AP", "PA")]
    assert abs(raw[0] - raw[1]) > 0.15 and weighted == pytest.approx([0.5, 0.5])


def test_mixer_hands_out_the_loss_weights_of_the_films_it_draws():
    src = I.Source("s", Path("x.csv"), 1.0, [Path(str(i)) for i in range(4)], np.array([1, 1, 1, 0]),
                   list("abcd"), ["AP"] * 4, list("abcd"))
    src.images = np.arange(4, dtype=np.uint8).reshape(4, 1, 1).repeat(2, 1).repeat(2, 2)
    m = CT.Mixer([src], torch.Generator().manual_seed(0), "view-label")
    imgs, y, w = m.batch(8)
    expected = CT.balance_weights(src, "view-label")
    assert np.allclose(w, expected[imgs[:, 0, 0]]) and np.allclose(y, src.labels[imgs[:, 0, 0]])
    _, _, w1 = CT.Mixer([src], torch.Generator().manual_seed(0)).batch(8)
    assert (w1 == 1).all()

def test_cv_folds_report_and_final_run_through_the_cli(tmp_path):
    labels = nih_subset_csv(tmp_path, 24)
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "triage_node.cli", "train", "--image-labels", str(labels), "--size", "64",
            "--batch-size", "8", "--val-frac", "0.25", "--test-frac", "0.25", "--cache-dir", str(tmp_path / "cache"),
            "--no-progress", "--threads", "1", "--epochs", "3", "--side-prior", "none"]

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(base + list(extra), capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)

    # a final run without its threshold fails before any work; a threshold where validation chooses it is refused
    r = run("--cv", "2:all", "--checkpoint-dir", str(tmp_path / "nothr"))
    assert r.returncode != 0 and "--threshold" in r.stderr and not (tmp_path / "nothr").exists()
    r = run("--cv", "2:0", "--threshold", "0.5", "--checkpoint-dir", str(tmp_path / "thr"))
    assert r.returncode != 0 and "only for a run without a validation split" in r.stderr
    runs = []
    for fold in (0, 1):
        ck = tmp_path / f"f{fold}"
        r = run("--cv", f"2:{fold}", "--checkpoint-dir", str(ck), "--stop-epoch", "2")
        assert r.returncode == 0, r.stderr[-3000:]
        hist = json.loads((ck / "summary.json").read_text())["history"]
        assert [h["epoch"] for h in hist] == [1, 2]  # --stop-epoch 2 of a 3-epoch schedule
        runs += ["--run", str(ck)]
    # a checkpoint dir holding another fold, or more epochs than asked for, is not resumed
    r = run("--cv", "2:1", "--checkpoint-dir", str(tmp_path / "f0"), "--stop-epoch", "2")
    assert r.returncode != 0 and "holds another run" in r.stderr
    r = run("--cv", "2:0", "--checkpoint-dir", str(tmp_path / "f0"), "--stop-epoch", "1")
    assert r.returncode != 0 and "already trained 2 epochs" in r.stderr
    splits = [json.loads((tmp_path / f"f{i}" / "split.json").read_text())[labels.parent.name] for i in (0, 1)]
    assert splits[0]["test"] == splits[1]["test"] and not set(splits[0]["val"]) & set(splits[1]["val"])
    assert set(splits[0]["val"]) | set(splits[1]["val"]) == set(splits[0]["train"]) | set(splits[0]["val"])
    out = tmp_path / "cv.json"
    r = subprocess.run([sys.executable, "-m", "triage_node.cli", "cv-report", *runs, "--image-labels", str(labels),
                        "--out", str(out)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["at_chosen_epoch"]["n"] == len(set(splits[0]["train"]) | set(splits[0]["val"]))
    assert set(rep["out_of_fold"]) == set(splits[0]["val"]) | set(splits[1]["val"])
    # the same folds compared with themselves through the CLI: a paired difference of exactly 0
    r = subprocess.run([sys.executable, "-m", "triage_node.cli", "cv-report", *runs, "--image-labels", str(labels),
                        "--out", str(tmp_path / "cv2.json"), "--compare", str(out)],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0 and "paired difference against" in r.stdout, r.stderr[-3000:]
    cmp = json.loads((tmp_path / "cv2.json").read_text())["compared"]
    assert cmp["difference"] == 0.0 and cmp["n"] == rep["at_chosen_epoch"]["n"] and cmp["report"] == str(out)
    t, e = rep["operating_point"]["threshold"], rep["chosen_epoch"]
    pkg = tmp_path / "pkg"
    r = run("--cv", "2:all", "--threshold", str(t), "--stop-epoch", str(e), "--checkpoint-dir",
            str(tmp_path / "final"), "--out", str(pkg), "--version", "0.0.1-cv-test")
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((pkg / "model.json").read_text())
    assert cfg["thresholds"]["gate"] == pytest.approx(t, abs=1e-6)
    assert "cross-validation 2:all" in cfg["training_data"]["split"]
    assert len(cfg["metrics"]["history"]) == e and "val_p" not in cfg["metrics"]["history"][0]
    assert cfg["metrics"]["best_val_auc"] is None  # no validation split: null, and model.json stays valid JSON
    assert "NaN" not in (pkg / "model.json").read_text()
    final = json.loads((tmp_path / "final" / "split.json").read_text())[labels.parent.name]
    assert set(final["train"]) == set(rep["out_of_fold"]) and final["val"] == [] and final["test"] == splits[0]["test"]


def test_train_with_view_label_balance_weights_the_loss_and_says_so(tmp_path):
    labels = nih_subset_csv(tmp_path, 24)  # 12 positive, 12 negative: the views are unbalanced within them
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "triage_node.cli", "train", "--image-labels", str(labels), "--size", "64",
            "--batch-size", "8", "--val-frac", "0.25", "--test-frac", "0.25", "--cache-dir", str(tmp_path / "cache"),
            "--no-progress", "--threads", "1", "--epochs", "1", "--side-prior", "none"]
    losses = {}
    for how in ("none", "view-label"):
        ck = tmp_path / how
        r = subprocess.run(base + ["--balance", how, "--checkpoint-dir", str(ck), "--out", str(tmp_path / f"p-{how}")],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        losses[how] = json.loads((ck / "summary.json").read_text())["history"][0]["loss"]
        cfg = json.loads((tmp_path / f"p-{how}" / "model.json").read_text())
        assert cfg["training"]["loss_balance"] == how
    # same seed, same films, same draws: only the loss weights differ
    assert losses["none"] != pytest.approx(losses["view-label"], abs=1e-6)


def test_cv_summary_by_age_band():
    keys = list("abcdefg")
    labels = dict(zip(keys, [1, 0, 1, 0, 1, 0, 0]))
    p = np.array([0.9, 0.1, 0.2, 0.8, 0.7, 0.3, 0.5])
    ages = {"a": 30, "b": 40, "c": 10, "d": 12, "e": 3, "f": 4, "g": 50.0}  # 18+: a b g; 6-17: c d; <6: e f
    s = CV.summarise(keys, p, labels, {}, 0, ages)
    assert s["by_age"]["18+"] == {"n": 3, "positives": 1, "auc": 1.0, "auc_ci95": s["by_age"]["18+"]["auc_ci95"]}
    assert s["by_age"]["6-17"]["auc"] == 0.0 and s["by_age"]["<6"]["auc"] == 1.0
    # a band of one class has no AUC (None, not a number); no ages given: no age breakdown at all
    one = CV.summarise(keys, p, labels, {}, 0, {"a": 30, "c": 10, "e": 3})
    assert one["by_age"]["18+"] == {"n": 1, "positives": 1, "auc": None, "auc_ci95": None}
    assert "by_age" not in CV.summarise(keys, p, labels, {}, 0)
