"""Evaluate a model package on real image-level data (+ optional boxes), as a reader study would report it.

    triage-node evaluate --model models/demo --image-labels ../shared/data/nih_adult/labels.csv \\
        --boxes ../shared/data/nih_adult/boxes.csv --split var/train/split.json:test --out var/eval/nih-test

Reports: AUC with a stratified bootstrap 95 % CI; sensitivity / specificity (Wilson 95 % CIs) at the package's
operating point; AUC within each view when the CSV has a ``view`` column (a model reading view markers shows
there); AUC by source and within view x source strata (``training.strata``: a model that learned the archive
scores well overall and not within a source); beside the AUC, the shortcut probe's on the same films (what
model-free statistics alone score: ``training.probe``; ``--no-probe`` skips it); localisation as ChestX-ray8
measures it (share of boxed films whose top box has IoBB = intersection over predicted-box area >= 0.1 with a
ground-truth box) plus IoU >= 0.4, and the Kaggle RSNA metric; per-image scores (``per_image.csv``) and an ROC
curve (``roc.png``). RSNA-format labels (``patientId,x,y,width,height,Target``) are read with ``--rsna-labels`` +
``--images``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from triage_node.inference.gate import roc_auc
from triage_node.training import images as I
from triage_node.training.auc import bootstrap_auc as bootstrap_auc  # re-exported: callers import it from here
from triage_node.training.auc import classification, paired_auc_difference, wilson
from triage_node.training.auc import mw_auc as mw_auc
from triage_node.training.metric import rsna_score
from triage_node.training.probe import format_probe, input_probe, network_inputs
from triage_node.training.strata import format_strata, probe_films, read_sources, strata

log = logging.getLogger(__name__)


@dataclass
class Item:
    path: Path
    label: int
    key: str
    view: str = ""
    boxes: np.ndarray | None = None  # xywh source pixels; None = not annotated
    age: float | None = None  # years, from the CSV's ``age`` column (None = unknown)
    source: str = ""  # the CSV's source / source_repo column, else the dataset's name (``training.strata``)
    group: str = ""  # the patient (the CSV's group column), for the shortcut probe's folds


def read_other_scores(report_dir: Path) -> dict[str, float]:
    """Another ``evaluate`` run's per-image probabilities; a clear error (before any film is scored) if unreadable."""
    try:
        with open(report_dir / "per_image.csv", newline="") as f:
            return {r["key"]: float(r["probability"]) for r in csv.DictReader(f)}
    except (OSError, KeyError, ValueError) as e:
        raise SystemExit(f"--compare {report_dir}: not an evaluate report folder with a readable per_image.csv "
                         f"({type(e).__name__}: {e})") from None


def compare_with(other: Path | dict[str, float], keys: list[str], y: np.ndarray, p: np.ndarray,
                 seed: int = 0, source: str = "") -> dict:
    """Paired comparison with another ``evaluate`` run (its folder, or its scores by film read from ``source``) on
    the films both scored. No film in common: ``{"error": ...}`` (this run's own report is still written)."""
    if not isinstance(other, dict):
        source, other = source or str(other), read_other_scores(other)
    common = [i for i, k in enumerate(keys) if k in other]
    if not common:
        return {"other": source, "error": "no film in common with this evaluation"}
    idx = np.array(common)
    out = paired_auc_difference(y[idx], p[idx], np.array([other[keys[i]] for i in common]), seed=seed)
    return {"other": source, "films_in_common": len(common), "films_only_here": len(keys) - len(common),
            "auc_difference_this_minus_other": out}


def iobb(pred_xywh: np.ndarray, gt_xywh: np.ndarray) -> np.ndarray:
    """Intersection over the predicted box's area, one predicted box against each ground-truth box."""
    px, py, pw, ph = (float(v) for v in pred_xywh)
    g = np.asarray(gt_xywh, np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(px + pw, g[:, 0] + g[:, 2]) - np.maximum(px, g[:, 0]), 0, None)
    ih = np.clip(np.minimum(py + ph, g[:, 1] + g[:, 3]) - np.maximum(py, g[:, 1]), 0, None)
    return iw * ih / max(pw * ph, 1e-9)


def localisation(top_boxes: list[np.ndarray | None], gts: list[np.ndarray | None]) -> dict:
    """Hit rates of the top box over films with ground truth: IoBB >= 0.1 (ChestX-ray8) and IoU >= 0.4."""
    from triage_node.training.metric import iou_matrix

    hits_iobb = hits_iou = n = 0
    for top, gt in zip(top_boxes, gts):
        if gt is None or len(gt) == 0:
            continue
        n += 1
        if top is None:
            continue
        hits_iobb += int(iobb(top, gt).max() >= 0.1)
        hits_iou += int(iou_matrix(top[None], gt).max() >= 0.4 - 1e-9)
    return {"boxed_films": n, "top_box_iobb_0.1": hits_iobb / n if n else float("nan"),
            "top_box_iobb_0.1_ci95": wilson(hits_iobb, n), "top_box_iou_0.4": hits_iou / n if n else float("nan"),
            "hits_iobb": hits_iobb, "hits_iou": hits_iou}


def read_items(args: argparse.Namespace) -> list[Item]:
    items: list[Item] = []
    if args.image_labels:
        src = I.read_source(args.image_labels)
        ages = src.ages or [None] * len(src)
        boxes = I.read_boxes(args.boxes) if args.boxes else {}
        keep = None
        if args.split:
            manifest, _, side = args.split.rpartition(":")
            keep = set(json.loads(Path(manifest).read_text())[src.name][side])
        sources = read_sources(args.image_labels, src.keys, src.name)
        for p, y, k, v, a, s, g in zip(src.paths, src.labels, src.keys, src.views, ages, sources, src.groups):
            if keep is None or k in keep:
                items.append(Item(p, int(y), k, v, boxes.get(k) if args.boxes else None, a, s, g))
    if args.rsna_labels:
        from triage_node.training.data import find_image, read_labels

        name = Path(args.rsna_labels).resolve().parent.name or "rsna"
        for k, b in read_labels(args.rsna_labels).items():
            items.append(Item(find_image(args.images, k), int(len(b) > 0), k, "", b, source=name, group=k))
    if args.max_images:
        items = items[: args.max_images]
    return items


def film_ages(items: list[Item], population: str) -> list[float | None]:
    """The age each film is scored at: ``auto`` = its own (the CSV's age column, else a DICOM file's Patient's Age or
    its birth date and study date, as the node reads them: ``triage_node.age``; None when unknown, which the node
    treats as an adult), ``pediatric`` = every film a child
    (the package's pediatric point, e.g. Kermany's films, which have no age column), ``adult`` = every film an
    adult."""
    if population == "pediatric":
        return [0.0] * len(items)
    if population == "adult":
        return [200.0] * len(items)
    return [it.age if it.age is not None else _header_age(it.path) for it in items]


def _header_age(path: Path) -> float | None:
    from triage_node import dicom_io
    from triage_node.errors import BadDataset

    if path.suffix.lower() not in (".dcm", ".dicom", ""):
        return None
    try:
        return dicom_io.patient_age_years(dicom_io.read(path, header_only=True))
    except BadDataset:  # unreadable: the film has no known age, as in the node
        return None


def run(model, items: list[Item], chunk: int = 16, ages: list[float | None] | None = None):
    """Raw outputs of every film; ``ages`` route films to an age-specific gate where the package has one."""
    from triage_node.training.data import load_image

    raws = []
    for i in range(0, len(items), chunk):
        raws += model.analyze([load_image(it.path) for it in items[i:i + chunk]], run_detector=True,
                              ages=None if ages is None else ages[i:i + chunk])
    return raws


def plot_roc(y: np.ndarray, p: np.ndarray, path: Path, title: str, t: float | np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = np.asarray(y).astype(bool)
    ts = np.r_[np.inf, np.sort(np.unique(p))[::-1]]
    tpr = [(p[y] >= s).mean() for s in ts]
    fpr = [(p[~y] >= s).mean() for s in ts]
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot(fpr, tpr, lw=2, label=f"AUC {roc_auc(y, p):.3f}")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    tv = np.broadcast_to(np.asarray(t, np.float64), y.shape)
    label = "operating point " + " / ".join(f"{v:.3f}" for v in sorted(set(tv.tolist())))
    ax.plot([(p[~y] >= tv[~y]).mean()], [(p[y] >= tv[y]).mean()], "ro", label=label)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a model package on image-level data (+ boxes)",
                                add_help=add_help)
    p.add_argument("--model", required=True, help="model package folder, or 'untrained'")
    p.add_argument("--image-labels", help="path,label[,view] CSV (paths relative to the CSV)")
    p.add_argument("--boxes", help="image_id,x,y,width,height CSV for --image-labels (localisation)")
    p.add_argument("--split", help="SPLIT_JSON:SIDE (from train's checkpoint dir) to evaluate one split only")
    p.add_argument("--rsna-labels", help="RSNA patientId,x,y,width,height,Target CSV (with --images)")
    p.add_argument("--images", help="folder of <patientId>.dcm for --rsna-labels")
    p.add_argument("--out", help="report folder (default var/eval/<model>-<time>)")
    p.add_argument("--tta", choices=("package", "on", "off"), default="package")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--max-images", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loc-subset", action="append", default=[], metavar="JSON:KEY",
                   help="also report localisation on the films listed under KEY of JSON (repeatable), e.g. "
                        "scripts/loc_split.json:test_images")
    p.add_argument("--population", choices=("auto", "pediatric", "adult"), default="auto",
                   help="the age each film is judged at when the package has an age-specific operating point: auto "
                        "= the CSV's age column (none: unknown, the adult point, as the node does without a Patient's "
                        "Age); pediatric / adult = every film (e.g. pediatric for Kermany, which has no age column)")
    p.add_argument("--compare", type=Path, metavar="REPORT_DIR",
                   help="another evaluate run on the same films: paired bootstrap CI of the AUC difference")
    p.add_argument("--no-probe", action="store_true",
                   help="skip the shortcut probe (model-free statistics of the same films fitted to the label)")
    p.add_argument("--cache-dir", type=Path, default=Path("var/cache"), help="the probe's film statistics cache")
    return p


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from triage_node.inference.model import load_model, untrained_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.image_labels or args.rsna_labels):
        raise SystemExit("give --image-labels CSV or --rsna-labels CSV --images DIR")
    model = untrained_model() if args.model == "untrained" else load_model(args.model, device="cpu")
    if args.tta != "package":
        model.tta = args.tta == "on"
    out = Path(args.out or f"var/eval/{model.info.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    items = read_items(args)
    other = read_other_scores(args.compare) if args.compare else None
    ages = film_ages(items, args.population)
    raws = run(model, items, ages=ages)
    y = np.array([it.label for it in items])
    p = np.array([r.probability for r in raws])
    points = [model.threshold_for(a) for a in ages]
    ts = np.array([t for t, _ in points])
    report: dict = {"model": {"name": model.info.name, "version": model.info.version, "path": str(args.model),
                              "tta": getattr(model, "tta", False)},
                    "data": {k: getattr(args, k) for k in ("image_labels", "boxes", "split", "rsna_labels",
                                                           "population")},
                    "classification": classification(y, p, ts, args.seed)}
    named = sorted({name for _, name in points if name})
    if named:  # the package has an age-specific operating point: how many films each point judged
        report["operating_points"] = {n: {"films": sum(1 for _, m in points if m == n),
                                          "threshold": next(t for t, m in points if m == n)} for n in named}
    views = sorted({it.view for it in items if it.view})
    if views:
        report["by_view"] = {v: classification(y[m], p[m], ts[m], args.seed) for v in views
                             for m in [np.array([it.view == v for it in items])]}
    report |= strata(y, p, [it.source for it in items], [it.view for it in items], args.seed)
    if not args.no_probe:
        report["shortcut_probe"] = probe_films([it.path for it in items], y, [it.source for it in items],
                                               [it.group or it.key for it in items], args.seed, args.cache_dir)
        # what the network sees: the films resized and harmonised as the package's worker does
        report["shortcut_probe_inputs"] = input_probe(
            network_inputs([it.path for it in items], model.gate_size, getattr(model, "harmonise", "none")), y,
            [it.group or it.key for it in items], seed=args.seed,
            name=f"network inputs ({getattr(model, 'harmonise', 'none')})")
    tops: list[np.ndarray | None] = []
    gated_tops: list[np.ndarray | None] = []
    gts: list[np.ndarray | None] = []
    preds: list[np.ndarray] = []
    scores: list[list[float]] = []
    for it, r, age in zip(items, raws, ages):
        pred = model.postprocess(r, use_gate=False)
        top = np.array([pred.detections[0].x, pred.detections[0].y, pred.detections[0].width,
                        pred.detections[0].height]) if pred.detections else None
        tops.append(top)
        gated = model.postprocess(r, age_years=age)
        gated_tops.append(top if gated.detections else None)
        gts.append(it.boxes)
        preds.append(np.array([[d.x, d.y, d.width, d.height] for d in gated.detections]).reshape(-1, 4))
        scores.append([d.score for d in gated.detections])
    if any(g is not None and len(g) for g in gts):
        report["localisation"] = {"top_box_any_probability": localisation(tops, gts),
                                  "top_box_as_sent (gated)": localisation(gated_tops, gts)}
        for spec in args.loc_subset:
            path, _, key = spec.rpartition(":")
            keep = set(json.loads(Path(path).read_text())[key])
            sel = [i for i, it in enumerate(items) if it.key in keep]
            report["localisation"][f"subset {spec}"] = localisation([tops[i] for i in sel], [gts[i] for i in sel])
    annotated = [g for g in gts if g is not None]
    if len(annotated) == len(gts):  # every film annotated (RSNA format): Kaggle's metric
        report["rsna_metric"] = rsna_score(annotated, preds, scores)
    with open(out / "per_image.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "label", "view", "probability", "positive", "top_box_xywh", "gt_boxes", "top_box_iobb",
                    "source"])
        for it, r, top, t in zip(items, raws, tops, ts):
            gt = it.boxes if it.boxes is not None and len(it.boxes) else None
            hit = "" if gt is None else "0.000" if top is None else f"{iobb(top, gt).max():.3f}"
            w.writerow([it.key, it.label, it.view, f"{r.probability:.5f}", int(r.probability >= t),
                        "" if top is None else " ".join(f"{v:.0f}" for v in top),
                        "" if it.boxes is None else " ".join(f"{v:.0f}" for v in it.boxes.ravel()), hit, it.source])
    if other is not None:
        report["compare"] = compare_with(other, [it.key for it in items], y, p, args.seed, str(args.compare))
    if len(set(y.tolist())) == 2:
        plot_roc(y, p, out / "roc.png", f"{model.info.name} {model.info.version}", ts)
    report["seconds"] = round(time.monotonic() - t0, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    c = report["classification"]
    print(f"n {c['n']} ({c['positives']} pos)  AUC {c['auc']:.3f} [{c['auc_ci95'][0]:.3f}, {c['auc_ci95'][1]:.3f}]  "
          f"sens {c['sensitivity']:.3f}  spec {c['specificity']:.3f}  acc {c['accuracy']:.3f} @ {c['threshold']}")
    for k in ("shortcut_probe", "shortcut_probe_inputs"):
        if k in report:
            print("  " + format_probe(report[k]))
    for n, op in report.get("operating_points", {}).items():
        print(f"  operating point {n}: {op['films']} films at {op['threshold']:.3f}")
    for v, cv in report.get("by_view", {}).items():
        print(f"  view {v}: n {cv['n']} AUC {cv['auc']:.3f} [{cv['auc_ci95'][0]:.3f}, {cv['auc_ci95'][1]:.3f}]")
    print("\n".join(format_strata(report)))
    for k, loc in report.get("localisation", {}).items():
        print(f"  {k}: {loc['boxed_films']} boxed films, IoBB>=0.1 {loc['top_box_iobb_0.1']:.3f}, "
              f"IoU>=0.4 {loc['top_box_iou_0.4']:.3f}")
    if "rsna_metric" in report:
        print(f"  RSNA metric {report['rsna_metric']:.4f}")
    if "compare" in report and "error" in report["compare"]:
        print(f"  vs {args.compare}: {report['compare']['error']} (no comparison)")
    elif "compare" in report:
        d = report["compare"]["auc_difference_this_minus_other"]
        print(f"  vs {args.compare} ({report['compare']['films_in_common']} films in common): AUC difference "
              f"{d['difference']:+.3f} [{d['ci95_low']:+.3f}, {d['ci95_high']:+.3f}] (paired bootstrap)")
    print(f"wrote {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
