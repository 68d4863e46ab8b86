"""Re-score the kept cross-validation evidence (docs/evidence/2026-12-06/cv-*.json, written before cv-report stored
which fold scored each film) with cv-report's mean per-fold paired difference.

The folds are recomputed from the split the runs used (seed 0, val/test 0.15, boxed patients held out, 4 folds by
patient) and checked against each report's stored per-fold AUCs at its chosen epoch before anything is compared.

    .venv/bin/python scripts/cv_rescore_evidence.py

Then the ensembles of those recipes (the mean of their out-of-fold probabilities, each at its chosen epoch) against
A alone, paired on the same films: what averaging several independently trained models would buy (each costs one
more network per film at inference).
"""

import json

import numpy as np

from triage_node.inference.gate import roc_auc
from triage_node.training import classifier_train as CT
from triage_node.training import cv_report as CV
from triage_node.training import images as I
from triage_node.training.evaluate import paired_auc_difference

NIH = "../shared/data/nih_adult"
EVIDENCE = "docs/evidence/2026-12-06/"
REPORTS = (("A", "cv-plain.json"), ("D", "cv-plain24.json"), ("E", "cv-plain-kermany.json"),
           ("F", "cv-baseline256.json"), ("G", "cv-balanced.json"))

src = I.read_source(f"{NIH}/labels.csv")
boxed = set(I.read_boxes(f"{NIH}/boxes.csv"))
force = {g for g, k in zip(src.groups, src.keys) if k in boxed}
tr, va, _ = I.group_split(src.groups, (0.15, 0.15), 0, force)
fold_of = {}
for f in range(4):
    for i in CT.cv_split(src.groups, tr, va, f"4:{f}", 0)[1]:
        fold_of[src.keys[i]] = f
labels = {k: int(v) for k, v in zip(src.keys, src.labels)}
views = {k: v for k, v in zip(src.keys, src.views) if v}
reps = {name: json.load(open(EVIDENCE + file)) for name, file in REPORTS}
for name, r in reps.items():
    ks = sorted(r["out_of_fold"])
    if set(ks) != set(fold_of):
        raise SystemExit(f"{name}: scored other films than the recomputed pool")
    y, p = np.array([labels[k] for k in ks]), np.array([r["out_of_fold"][k] for k in ks])
    fo = np.array([fold_of[k] for k in ks])
    mine = [roc_auc(y[fo == f], p[fo == f]) for f in range(4)]
    if not np.allclose(mine, r["curve"][r["chosen_epoch"] - 1]["fold_aucs"], atol=1e-4):
        raise SystemExit(f"{name}: the recomputed folds do not reproduce the stored per-fold AUCs: not these folds")
    print(f"{name}: epoch {r['chosen_epoch']}, pooled AUC {r['at_chosen_epoch']['auc']:.3f}, "
          f"mean per fold {np.mean(mine):.3f} (folds recomputed and checked)")
    r["fold_of"] = fold_of
for name in "DEFG":
    c = CV.compare(reps["A"], reps[name], labels, views=views)
    m = c["mean_fold"]
    print(f"A - {name}: pooled {c['difference']:+.3f} [{c['ci95_low']:+.3f}, {c['ci95_high']:+.3f}]  "
          f"mean per fold {m['difference']:+.3f} [{m['ci95_low']:+.3f}, {m['ci95_high']:+.3f}]")

ks = sorted(fold_of)
y, fo = np.array([labels[k] for k in ks]), np.array([fold_of[k] for k in ks])


def scores(name: str) -> np.ndarray:
    return np.array([reps[name]["out_of_fold"][k] for k in ks])


for combo in ("AG", "AD", "AGD", "AGDF"):
    ens = np.mean([scores(n) for n in combo], axis=0)
    d = paired_auc_difference(y, ens, scores("A"))
    m = CV.paired_mean_fold_auc_difference(y, ens, scores("A"), fo)
    name = "+".join(combo)
    print(f"ensemble {name} - A: pooled {d['difference']:+.3f} [{d['ci95_low']:+.3f}, {d['ci95_high']:+.3f}]  "
          f"mean per fold {m['difference']:+.3f} [{m['ci95_low']:+.3f}, {m['ci95_high']:+.3f}]")
