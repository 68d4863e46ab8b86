"""AUC by source and within view x source strata (``training.strata``) in ``evaluate`` and ``cv-report``: hand-made
scores with hand-computed stratum AUCs, small strata reported with counts and no AUC, the printed table and the
stored JSON of both commands."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import nih_subset_csv

from triage_node.inference.model import RawOutput
from triage_node.training import cv_report as CV
from triage_node.training import evaluate, probe
from triage_node.training.strata import format_strata, read_sources, strata

# repoA, PA: positives 0.9 0.8 0.7 0.6 0.5 over negatives 0.55 0.4 0.3 0.2 0.1: 24 of 25 pairs right (0.5 < 0.55)
# repoA, AP: positives 0.3 0.2 0.6 0.1 0.4 over negatives 0.5 0.35 0.25 0.15 0.05: 3+2+5+1+4 = 15 of 25
# repoA, both views: per positive, negatives below it (a tie counts half: the AP positives 0.3 0.2 0.1 0.4 tie PA
#   negatives, PA positive 0.5 ties an AP negative): 10 10 10 10 8.5 | 5.5 3.5 10 1.5 7.5 = 76.5 of 100
# repoB (PA): 2 positives, 3 negatives: too few for an AUC; one more film of repoB without a view
FILMS = (
    [("PA", "repoA", 1, s) for s in (0.9, 0.8, 0.7, 0.6, 0.5)]
    + [("PA", "repoA", 0, s) for s in (0.55, 0.4, 0.3, 0.2, 0.1)]
    + [("AP", "repoA", 1, s) for s in (0.3, 0.2, 0.6, 0.1, 0.4)]
    + [("AP", "repoA", 0, s) for s in (0.5, 0.35, 0.25, 0.15, 0.05)]
    + [("PA", "repoB", 1, s) for s in (0.9, 0.1)]
    + [("PA", "repoB", 0, s) for s in (0.5, 0.6, 0.7)]
    + [("", "repoB", 0, 0.2)]
)
VIEWS, SOURCES, Y, P = (list(c) for c in zip(*FILMS))


def _check(result: dict) -> None:
    a = result["by_source"]["repoA"]
    assert (a["n"], a["positives"], a["negatives"]) == (20, 10, 10)
    assert a["auc"] == pytest.approx(0.765)
    assert a["auc_ci95"][0] < 0.765 < a["auc_ci95"][1]
    b = result["by_source"]["repoB"]
    assert b == {"n": 6, "positives": 2, "negatives": 4, "auc": None, "auc_ci95": None,
                 "note": "fewer than 5 films of a class"}
    vs = result["by_view_source"]
    assert set(vs) == {"AP", "PA"} and set(vs["AP"]) == {"repoA"} and set(vs["PA"]) == {"repoA", "repoB"}
    assert vs["PA"]["repoA"]["auc"] == pytest.approx(0.96) and vs["PA"]["repoA"]["n"] == 10
    assert vs["AP"]["repoA"]["auc"] == pytest.approx(0.60)
    assert vs["PA"]["repoB"]["auc"] is None and vs["PA"]["repoB"]["n"] == 5  # the film without a view is left out


def test_strata_on_hand_computed_scores():
    result = strata(Y, P, SOURCES, VIEWS, seed=0)
    _check(result)
    assert json.loads(json.dumps(result)) == result  # JSON as is (None, not NaN, for a small stratum)
    no_views = strata(Y, P, SOURCES)
    assert "by_view_source" not in no_views and no_views["by_source"] == result["by_source"]
    lines = format_strata(result)
    row = {ln.split()[0] + (" " + ln.split()[2] if ln.split()[1] == "/" else ""): ln for ln in lines[1:]}
    assert "0.765 [" in row["repoA"] and "no AUC (fewer than 5 films of a class)" in row["repoB"]
    assert "0.960 [" in row["PA repoA"] and "0.600 [" in row["AP repoA"] and "no AUC" in row["PA repoB"]
    assert row["repoB"].split()[1:4] == ["6", "2", "4"]


def _labels_csv(folder: Path, with_source: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "labels.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "image_id", "nih_patient_id", "view"] + (["source_repo"] if with_source else []))
        for i, (view, src, y, _) in enumerate(FILMS):
            w.writerow([f"images/f{i:02d}.png", y, f"f{i:02d}", str(100 + i), view] + ([src] if with_source else []))
    return path


def test_sources_come_from_the_csv_or_the_dataset_name(tmp_path):
    labels = _labels_csv(tmp_path / "clean")
    keys = [f"f{i:02d}" for i in range(len(FILMS))]
    assert read_sources(labels, keys, "clean") == SOURCES
    assert read_sources(f"{labels}:0.5", ["f00", "nope"], "clean") == ["repoA", "clean"]  # a weight; unknown key
    plain = _labels_csv(tmp_path / "adult", with_source=False)
    assert read_sources(plain, keys[:2], "adult") == ["adult", "adult"]


def test_evaluate_reports_and_prints_the_strata(tmp_path, monkeypatch, capsys):
    labels = _labels_csv(tmp_path / "clean")
    scores = dict(zip([f"f{i:02d}" for i in range(len(FILMS))], P))

    def run(model, items, chunk=16, ages=None):  # the hand-made scores instead of a model's
        return [RawOutput(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32),
                          scores[it.key], 64, 64) for it in items]

    monkeypatch.setattr(evaluate, "run", run)
    out = tmp_path / "eval"
    args = evaluate.get_args_parser().parse_args(
        ["--model", "untrained", "--image-labels", str(labels), "--out", str(out), "--threads", "1", "--no-probe"])
    assert evaluate.main(args) == 0
    rep = json.loads((out / "report.json").read_text())
    _check(rep)
    printed = capsys.readouterr().out
    assert "no AUC (fewer than 5 films of a class)" in printed and "0.765 [" in printed and "0.960 [" in printed
    with open(out / "per_image.csv", newline="") as f:
        assert [r["source"] for r in csv.DictReader(f)] == SOURCES


def test_cv_report_reports_and_prints_the_strata(tmp_path, capsys):
    labels = _labels_csv(tmp_path / "clean")
    keys = [f"f{i:02d}" for i in range(len(FILMS))]
    runs = []
    for fold, part in enumerate((keys[0::2], keys[1::2])):  # two folds, each half of every stratum's films
        run = tmp_path / f"f{fold}"
        run.mkdir()
        (run / "split.json").write_text(json.dumps({"clean": {"train": [k for k in keys if k not in part], "val": part,
                                                              "test": [], "cv": f"2:{fold}", "epochs": 1}}))
        val_p = [P[keys.index(k)] for k in part]
        (run / "summary.json").write_text(json.dumps({"best_epoch": 1, "history": [{"epoch": 1, "val_p": val_p}]}))
        runs += ["--run", str(run)]
    out = tmp_path / "cv.json"
    args = CV.get_args_parser().parse_args([*runs, "--image-labels", str(labels), "--out", str(out), "--no-probe"])
    assert CV.main(args) == 0
    rep = json.loads(out.read_text())
    _check(rep["at_chosen_epoch"])  # pooled out-of-fold scores: the same films with the same scores
    printed = capsys.readouterr().out
    assert "no AUC (fewer than 5 films of a class)" in printed and "0.765 [" in printed and "0.600 [" in printed
    assert "shortcut_probe" not in rep["at_chosen_epoch"] and "shortcut probe" not in printed  # --no-probe


def _hand_made_run(scores: dict[str, float]):
    def run(model, items, chunk=16, ages=None):  # the hand-made scores instead of a model's
        return [RawOutput(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32),
                          scores[it.key], 64, 64) for it in items]
    return run


def test_the_shortcut_probe_goes_beside_the_auc_on_the_same_films(tmp_path, monkeypatch, capsys):
    """``evaluate`` and ``cv-report`` on 24 real NIH films: the probe's AUC with its CI is stored and printed on the
    line after the model's AUC, and it is the probe of exactly those films (the same figure as the probe called
    directly on them)."""
    labels = nih_subset_csv(tmp_path, 24)
    with open(labels, newline="") as f:
        rows = list(csv.DictReader(f))
    keys, y = [r["image_id"] for r in rows], [int(r["label"]) for r in rows]
    scores = dict(zip(keys, np.linspace(0.1, 0.9, len(keys))))
    direct = probe.shortcut_probe(probe.film_records([Path(r["path"]) for r in rows], ["nih_adult"] * len(rows),
                                                     [r["nih_patient_id"] for r in rows], cache_dir=None),
                                  y, [r["nih_patient_id"] for r in rows])
    assert direct["n"] == 24 and 0 <= direct["auc"] <= 1 and all(0 <= v <= 1 for v in direct["ci95"])

    monkeypatch.setattr(evaluate, "run", _hand_made_run(scores))
    out = tmp_path / "eval"
    args = evaluate.get_args_parser().parse_args(
        ["--model", "untrained", "--image-labels", str(labels), "--out", str(out), "--threads", "1",
         "--cache-dir", str(tmp_path / "cache")])
    assert evaluate.main(args) == 0
    rep = json.loads((out / "report.json").read_text())
    got = rep["shortcut_probe"]
    assert (got["n"], got["positives"]) == (24, 12) and got["auc"] == pytest.approx(direct["auc"])
    assert got["ci95"] == pytest.approx(direct["ci95"])
    inputs = rep["shortcut_probe_inputs"]  # what the network sees, resized and harmonised as the package does
    assert inputs["n"] == 24 and inputs["name"] == "network inputs (none)" and 0 <= inputs["auc"] <= 1
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("n 24 (12 pos)  AUC"))
    assert lines[at + 1].startswith(f"  shortcut probe raw films: AUC {direct['auc']:.3f} [{direct['ci95'][0]:.3f}, ")

    runs = []
    for fold, part in enumerate((keys[0::2], keys[1::2])):
        run = tmp_path / f"f{fold}"
        run.mkdir()
        (run / "split.json").write_text(json.dumps({labels.parent.name: {
            "train": [k for k in keys if k not in part], "val": part, "test": [], "cv": f"2:{fold}", "epochs": 1}}))
        (run / "summary.json").write_text(json.dumps({"best_epoch": 1, "history": [
            {"epoch": 1, "val_p": [float(scores[k]) for k in part]}]}))
        runs += ["--run", str(run)]
    cv_out = tmp_path / "cv.json"
    args = CV.get_args_parser().parse_args([*runs, "--image-labels", str(labels), "--out", str(cv_out),
                                            "--cache-dir", str(tmp_path / "cache")])
    assert CV.main(args) == 0
    got = json.loads(cv_out.read_text())["at_chosen_epoch"]["shortcut_probe"]
    # the same 24 films in another order: the same features, folds drawn on another order
    assert (got["n"], got["positives"]) == (24, 12) and 0 <= got["auc"] <= 1 and len(got["ci95"]) == 2
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, ln in enumerate(lines) if "out-of-fold n 24 (12 pos) AUC" in ln)
    assert lines[at + 1].startswith("  shortcut probe raw films (the out-of-fold films): AUC ")
