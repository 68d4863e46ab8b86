"""Pool a k-fold cross-validation of ``triage-node train --cv K:FOLD`` runs into one estimate, and choose the epoch
count and the operating threshold of the final run on the whole pool (``--cv K:all``).

    triage-node cv-report --run var/cv/f0 --run var/cv/f1 --run var/cv/f2 --run var/cv/f3 \\
        --image-labels ../shared/data/nih_adult/labels.csv --out var/cv/report.json

Each fold run records its validation scores after every epoch (``summary.json``: ``history[].val_p``, in the order
of its ``split.json`` val keys). Every film of the pool is validated by exactly one fold, so the pooled
out-of-fold scores cover the whole pool (500 films instead of one 84-film validation split). The rule, fixed here
before any run is read:

* **epoch** (``--epoch-rule``):
  - ``last`` (the default): the last epoch every fold reached, i.e. the end of the schedule when no fold stopped
    early. Nothing is chosen on the scores, so the figures at it are not optimistic, and the final run
    (``--cv K:all``) trains the same schedule to its end.
  - ``best-mean``: the epoch with the highest mean per-fold validation AUC over the epochs every fold reached (the
    rule of steps 9-17 of ``scripts/train_demo.sh``). It is chosen on the scores it reports, so it is optimistic;
    and in mid-schedule the folds' scores can sit on different scales, so the pooled AUC at the chosen epoch can
    fall well below the mean per fold it was chosen by (step 16: 0.841 pooled against 0.879 per fold).
* **threshold** = the highest threshold with sensitivity >= ``--target-sensitivity`` on the pooled out-of-fold
  scores at that epoch.

Pooled AUC mixes the scores of K models (their calibrations differ); the mean of the per-fold AUCs is reported
beside it, with a warning when the two disagree by more than ``POOLING_GAP``. The AUC at each fold's own best
epoch (what early stopping would give) and at the last common epoch are reported too. ``--compare`` gives two
paired differences against another report of the same folds: of the pooled AUC, and of the mean per-fold AUC
(a bootstrap stratified by fold, which the folds' calibrations cannot distort).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from triage_node.inference.gate import roc_auc
from triage_node.training import images as I
from triage_node.training.auc import bootstrap_auc, paired_auc_difference
from triage_node.training.auc import paired_mean_fold_auc_difference as paired_mean_fold_auc_difference
from triage_node.training.classifier_train import operating_point, parse_cv, threshold_for_sensitivity
from triage_node.training.probe import format_probe
from triage_node.training.strata import format_strata, probe_films, read_sources, strata


def read_fold(run: Path) -> dict:
    """One fold run: its cv spec, val keys and per-epoch val scores (from split.json and summary.json)."""
    try:
        manifest = json.loads((run / "split.json").read_text())
        summary = json.loads((run / "summary.json").read_text())
    except FileNotFoundError as e:
        raise SystemExit(f"{run}: not a finished training run ({Path(e.filename).name} missing)") from None
    name, primary = next(iter(manifest.items()))
    if "cv" not in primary:
        raise SystemExit(f"{run}: not a cross-validation run (train --cv K:FOLD)")
    k, fold = parse_cv(primary["cv"])
    if fold is None:
        raise SystemExit(f"{run}: the final run on the whole pool (--cv {primary['cv']}) has no out-of-fold scores")
    keys = primary["val"]
    epochs = [np.asarray(h["val_p"], np.float64) for h in summary["history"] if "val_p" in h]
    if not epochs or any(len(e) != len(keys) for e in epochs):
        raise SystemExit(f"{run}: per-epoch validation scores missing or not matching its split")
    return {"run": str(run), "source": name, "k": k, "fold": fold, "keys": keys, "scores": epochs,
            "best_epoch": summary.get("best_epoch"), "pool": sorted(set(primary.get("train", [])) | set(keys)),
            "test": sorted(primary.get("test", [])), "epochs": primary.get("epochs")}


def pool(folds: list[dict], labels: dict[str, int]) -> dict:
    """Checks that the folds belong to one cross-validation and do not overlap."""
    ks = {f["k"] for f in folds}
    if len(ks) != 1 or len({f["source"] for f in folds}) != 1:
        raise SystemExit("the runs are not folds of one cross-validation (different K or primary source)")
    for f in folds[1:]:  # one pool, one test split, one schedule: else the runs were split differently
        for what in ("pool", "test", "epochs"):
            if f[what] != folds[0][what] and None not in (f[what], folds[0][what]):
                raise SystemExit(f"the runs are not folds of one cross-validation: {f['run']} and {folds[0]['run']} "
                                 f"differ in their {what} (another --seed, --val-frac, --test-frac or --epochs?)")
    seen: dict[str, int] = {}
    for f in folds:
        for key in f["keys"]:
            if key in seen:
                raise SystemExit(f"film {key} is validated by two runs (folds {seen[key]} and {f['fold']})")
            if key not in labels:
                raise SystemExit(f"film {key} of fold {f['fold']} is not in the labels CSV")
            seen[key] = f["fold"]
    k = ks.pop()
    present = sorted(f["fold"] for f in folds)
    warnings = [] if len(present) == k else [f"only folds {present} of {k}: the out-of-fold scores cover "
                                              f"{len(seen)} of the pool's films"]
    return {"k": k, "folds_present": present, "warnings": warnings}


def oof(folds: list[dict], epoch_of: list[int]) -> tuple[list[str], np.ndarray]:
    """Pooled out-of-fold scores, fold i taken at epoch ``epoch_of[i]`` (1-based)."""
    keys: list[str] = []
    scores: list[np.ndarray] = []
    for f, e in zip(folds, epoch_of):
        keys += f["keys"]
        scores.append(f["scores"][e - 1])
    return keys, np.concatenate(scores)


#: Age bands of the out-of-fold summary (years, [low, high)): the node's pediatric gate takes < 6 (the shipped
#: package's max_age_years); 6-17 are minors that the adult gate judges.
AGE_BANDS = (("<6", 0.0, 6.0), ("6-17", 6.0, 18.0), ("18+", 18.0, float("inf")))


def summarise(keys: list[str], p: np.ndarray, labels: dict[str, int], views: dict[str, str], seed: int,
              ages: dict[str, float] | None = None, sources: dict[str, str] | None = None) -> dict:
    """AUC with CI, by view, by age band (``ages``), by source and within view x source (``sources``:
    ``training.strata``)."""
    y = np.array([labels[k] for k in keys])
    out: dict = {"n": len(y), "positives": int(y.sum()), "auc": roc_auc(y, p),
                 "auc_ci95": bootstrap_auc(y, p, seed=seed)}
    v = np.array([views.get(k, "") for k in keys])
    out["by_view"] = {view: {"n": int(m.sum()), "auc": roc_auc(y[m], p[m])}
                      for view in sorted(set(v) - {""}) for m in [v == view]}
    if ages:
        a = np.array([ages.get(k, np.nan) for k in keys], np.float64)
        out["by_age"] = {}
        for band, lo, hi in AGE_BANDS:
            m = (a >= lo) & (a < hi)
            if m.any():
                two = 0 < y[m].sum() < m.sum()
                out["by_age"][band] = {"n": int(m.sum()), "positives": int(y[m].sum()),
                                       "auc": roc_auc(y[m], p[m]) if two else None,
                                       "auc_ci95": bootstrap_auc(y[m], p[m], seed=seed) if two else None}
    if sources:
        out |= strata(y, p, [sources.get(k, "") for k in keys], list(v), seed)
    return out


#: How the epoch of the out-of-fold figures (and of the final run) is chosen; see the module's docstring.
EPOCH_RULES = {
    "last": "epoch: the last epoch every fold reached (not chosen on the scores)",
    "best-mean": "epoch: highest mean per-fold validation AUC over the epochs every fold reached",
}
#: Pooled and mean per-fold AUC further apart than this at the reported epoch: the report warns (the folds' scores
#: sit on different scales, so the pooled figure understates the ranking each fold's model achieves).
POOLING_GAP = 0.02


def report(folds: list[dict], labels: dict[str, int], views: dict[str, str], target: float, seed: int = 0,
           ages: dict[str, float] | None = None, epoch_rule: str = "last",
           sources: dict[str, str] | None = None) -> dict:
    if epoch_rule not in EPOCH_RULES:
        raise ValueError(f"unknown epoch rule {epoch_rule!r}: expected one of {', '.join(EPOCH_RULES)}")
    meta = pool(folds, labels)
    reached = min(len(f["scores"]) for f in folds)
    curve: list[dict] = []
    for f in folds:
        ys = {labels[k] for k in f["keys"]}
        if len(ys) < 2:
            raise SystemExit(f"fold {f['fold']} ({f['run']}) validates films of one class only: its AUC is undefined "
                             "(fewer folds, or a larger pool)")
    for e in range(1, reached + 1):
        per_fold = [roc_auc([labels[k] for k in f["keys"]], f["scores"][e - 1]) for f in folds]
        curve.append({"epoch": e, "mean_fold_auc": float(np.mean(per_fold)), "fold_aucs": per_fold,
                      "pooled_auc": roc_auc(*_yp(folds, [e] * len(folds), labels))})
    if epoch_rule == "last":
        chosen = reached
    else:
        chosen = int(max(curve, key=lambda c: float(c["mean_fold_auc"]))["epoch"])
    reached_each = [len(f["scores"]) for f in folds]
    if epoch_rule == "last" and len(set(reached_each)) > 1:
        meta["warnings"].append(f"the folds ran {reached_each} epochs (early stopping?): the last epoch every fold "
                                f"reached, {reached}, is not the end of every fold's schedule")
    keys, p = oof(folds, [chosen] * len(folds))
    y = np.array([labels[k] for k in keys])
    t = threshold_for_sensitivity(y, p, target)
    best = [int(f["best_epoch"] or len(f["scores"])) for f in folds]
    at = curve[chosen - 1]
    gap = at["mean_fold_auc"] - at["pooled_auc"]
    if gap > POOLING_GAP:
        meta["warnings"].append(
            f"at epoch {chosen} the pooled AUC ({at['pooled_auc']:.3f}) is {gap:.3f} below the mean per-fold AUC "
            f"({at['mean_fold_auc']:.3f}): the folds' scores sit on different scales; compare recipes by the mean "
            "per fold (--compare reports both)")
    return meta | {
        "rule": f"{EPOCH_RULES[epoch_rule]}; threshold: highest with sensitivity >= {target} on the pooled "
                "out-of-fold scores at that epoch",
        "epoch_rule": epoch_rule,
        "epochs_reached": reached_each, "chosen_epoch": chosen,
        "at_chosen_epoch": summarise(keys, p, labels, views, seed, ages, sources)
        | {"mean_fold_auc": at["mean_fold_auc"], "fold_aucs": at["fold_aucs"]},
        "operating_point": operating_point(y, p, t),
        "at_each_folds_best_epoch": summarise(*oof(folds, best), labels, views, seed) | {"epochs": best},
        "at_last_common_epoch": summarise(*oof(folds, [reached] * len(folds)), labels, views, seed)
        | {"epoch": reached},
        "curve": curve, "runs": [f["run"] for f in folds],
        "out_of_fold": dict(zip(keys, (round(float(v), 5) for v in p))),
        "fold_of": {k: f["fold"] for f in folds for k in f["keys"]},
    }


def _yp(folds: list[dict], epochs: list[int], labels: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    keys, p = oof(folds, epochs)
    return np.array([labels[k] for k in keys]), p


def compare(rep: dict, other: dict, labels: dict[str, int], seed: int = 0,
            views: dict[str, str] | None = None) -> dict:
    """This report's out-of-fold AUC minus another's, each at its chosen epoch, on the same films (paired
    bootstrap), overall and (``views``) within each view. Both must cover the same films: two recipes
    cross-validated on one pool with the same folds. When both reports say which fold scored each film (reports of
    this version), the difference of the mean per-fold AUC is given too (``mean_fold``), and two reports whose
    folds differ are refused."""
    mine, theirs = rep["out_of_fold"], other["out_of_fold"]
    if set(mine) != set(theirs):
        raise SystemExit(f"--compare: the two cross-validations scored different films ({len(set(mine) ^ set(theirs))} "
                         "differ): not the same pool")
    keys = sorted(mine)
    y = np.array([labels[k] for k in keys])
    a, b = np.array([mine[k] for k in keys]), np.array([theirs[k] for k in keys])
    d = paired_auc_difference(y, a, b, seed=seed)
    v = np.array([(views or {}).get(k, "") for k in keys])
    by_view = {view: paired_auc_difference(y[m], a[m], b[m], seed=seed)
               for view in sorted(set(v) - {""}) for m in [v == view] if len(set(y[m].tolist())) == 2}
    extra: dict = {"by_view": by_view} if by_view else {}
    if "fold_of" in rep and "fold_of" in other:
        if rep["fold_of"] != other["fold_of"]:
            raise SystemExit("--compare: the two cross-validations put the films in different folds: not the same "
                             "folds (another --seed?)")
        fold = np.array([rep["fold_of"][k] for k in keys])
        extra["mean_fold"] = paired_mean_fold_auc_difference(y, a, b, fold, seed=seed)
    rules = rep.get("epoch_rule", "best-mean"), other.get("epoch_rule", "best-mean")  # older reports: best-mean
    return d | {"other_runs": other.get("runs"), "other_chosen_epoch": other.get("chosen_epoch"),
                "epoch_rules": list(rules)} | extra


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Pool k-fold cross-validation runs: out-of-fold AUC, epoch, threshold",
                                add_help=add_help)
    p.add_argument("--run", action="append", required=True, type=Path, help="a fold's --checkpoint-dir (repeat)")
    p.add_argument("--image-labels", required=True, help="the primary source's path,label[,view] CSV")
    p.add_argument("--target-sensitivity", type=float, default=0.90)
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", type=Path, default=Path("var/cv/report.json"))
    p.add_argument("--epoch-rule", choices=tuple(EPOCH_RULES), default="last",
                   help="the epoch reported (and trained by the final run): the last every fold reached (default), or "
                        "the best mean per-fold AUC (optimistic: chosen on the scores it reports)")
    p.add_argument("--compare", type=Path, metavar="REPORT",
                   help="another cv-report's report.json on the same pool: paired AUC difference (this - that)")
    p.add_argument("--no-probe", action="store_true",
                   help="skip the shortcut probe (model-free statistics of the same films fitted to the label)")
    p.add_argument("--cache-dir", type=Path, default=Path("var/cache"), help="the probe's film statistics cache")
    return p


def main(args: argparse.Namespace) -> int:
    src = I.read_source(args.image_labels)
    labels = {k: int(v) for k, v in zip(src.keys, src.labels)}
    views = {k: v for k, v in zip(src.keys, src.views) if v}
    ages = {k: float(a) for k, a in zip(src.keys, src.ages) if a is not None}
    sources = dict(zip(src.keys, read_sources(args.image_labels, src.keys, src.name)))
    folds = sorted((read_fold(r) for r in args.run), key=lambda f: f["fold"])
    rep = report(folds, labels, views, args.target_sensitivity, args.seed, ages, args.epoch_rule, sources)
    if not args.no_probe:  # on the out-of-fold films, beside their AUC
        keys = list(rep["out_of_fold"])
        path_of, group_of = dict(zip(src.keys, src.paths)), dict(zip(src.keys, src.groups))
        rep["at_chosen_epoch"]["shortcut_probe"] = probe_films(
            [path_of[k] for k in keys], [labels[k] for k in keys], [sources[k] for k in keys],
            [group_of[k] for k in keys], args.seed, args.cache_dir, "raw films (the out-of-fold films)")
    if args.compare:
        rep["compared"] = compare(rep, json.loads(args.compare.read_text()), labels, args.seed, views) | {
            "report": str(args.compare)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rep, indent=1, default=float) + "\n")
    for c in rep["curve"]:
        print(f"epoch {c['epoch']:2d}: mean fold AUC {c['mean_fold_auc']:.3f}  pooled {c['pooled_auc']:.3f}  "
              f"folds {' '.join(f'{a:.3f}' for a in c['fold_aucs'])}")
    for w in rep["warnings"]:
        print(f"warning: {w}")
    a, op = rep["at_chosen_epoch"], rep["operating_point"]
    print(f"{rep['k']}-fold CV, folds {rep['folds_present']}: chosen epoch {rep['chosen_epoch']}; out-of-fold "
          f"n {a['n']} ({a['positives']} pos) AUC {a['auc']:.3f} [{a['auc_ci95'][0]:.3f}, {a['auc_ci95'][1]:.3f}] "
          + " ".join(f"{v} {d['auc']:.3f} (n {d['n']})" for v, d in a["by_view"].items()))
    if "shortcut_probe" in a:
        print("  " + format_probe(a["shortcut_probe"]))
    for band, d in a.get("by_age", {}).items():
        auc = ("n/a (one class)" if d["auc"] is None
               else f"{d['auc']:.3f} [{d['auc_ci95'][0]:.3f}, {d['auc_ci95'][1]:.3f}]")
        print(f"  age {band}: n {d['n']} ({d['positives']} pos) AUC {auc}")
    print("\n".join(format_strata(a)))
    print(f"threshold {op['threshold']:.4f}: sensitivity {op['sensitivity']:.3f} specificity {op['specificity']:.3f}")
    b = rep["at_each_folds_best_epoch"]
    print(f"at each fold's best epoch {b['epochs']}: AUC {b['auc']:.3f} (optimistic: early stopping on these films)")
    if "compared" in rep:
        c = rep["compared"]
        print(f"paired difference against {c['report']} (epoch {c['other_chosen_epoch']}): AUC "
              f"{c['difference']:+.3f} [{c['ci95_low']:+.3f}, {c['ci95_high']:+.3f}] over {c['n']} films")
        if "mean_fold" in c:
            m = c["mean_fold"]
            print(f"  mean per-fold AUC: {m['difference']:+.3f} [{m['ci95_low']:+.3f}, {m['ci95_high']:+.3f}] "
                  f"(bootstrap within each of {m['folds']} folds)")
        if len(set(c["epoch_rules"])) > 1:
            print(f"  note: the two reports chose their epochs by different rules: {c['epoch_rules']}")
        for view, d in c.get("by_view", {}).items():
            print(f"  within {view}: {d['difference']:+.3f} [{d['ci95_low']:+.3f}, {d['ci95_high']:+.3f}] "
                  f"over {d['n']} films")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
