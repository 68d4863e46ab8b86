"""Choose an age-specific operating point for a model package on held-out films of that population.

    triage-node calibrate --model var/cv-plain/pkg --image-labels ../shared/data/kermany_224/labels.csv \\
        --split models/demo/split.json:train --population pediatric --max-age 6 --min-sensitivity 0.90

A model trained on adult films scores children's films on another scale: at its adult operating point (sensitivity
0.90 on adult validation films) one such model flagged 92 % of normal pediatric films. The node therefore keeps a
second gate threshold for patients younger than ``--max-age`` years (read from Patient's Age; a film without one
gets the adult point). This command scores the given films (which must not be the ones the point is judged on
later) and writes into the package's ``model.json`` the threshold with the highest accuracy among those with
sensitivity >= ``--min-sensitivity`` (ties: the highest such threshold), with what it was chosen on. The weights
and their checksums are unchanged; ``--out`` writes a copy of the package instead of changing it in place.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from triage_node.training.classifier_train import operating_point
from triage_node.training.evaluate import read_items, run


def choose_threshold(y: np.ndarray, p: np.ndarray, min_sensitivity: float) -> dict:
    """The threshold (a film is positive when its score >= it) with the highest accuracy among those whose
    sensitivity is >= ``min_sensitivity``; ties go to the highest threshold (fewer false alarms for equal accuracy).
    Candidates are the films' own scores. Raises ValueError without positives or negatives."""
    y, p = np.asarray(y).astype(bool), np.asarray(p, np.float64)
    if y.all() or not y.any():
        raise ValueError("calibration needs positive and negative films")
    best: tuple[float, float] | None = None
    for t in np.unique(p)[::-1]:  # highest first: the first of equal accuracy is kept
        sens = float((p[y] >= t).mean())
        if sens < min_sensitivity:
            continue
        acc = float(((p >= t) == y).mean())
        if best is None or acc > best[1]:
            best = (float(t), acc)
    assert best is not None  # the lowest score flags every film: sensitivity 1.0
    return operating_point(y, p, best[0])


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Choose and package an age-specific (pediatric) operating point",
                                add_help=add_help)
    p.add_argument("--model", required=True, help="model package folder")
    p.add_argument("--image-labels", required=True, help="path,label CSV of films of that population")
    p.add_argument("--split", help="SPLIT_JSON:SIDE: score only these films (e.g. a split the model never trained "
                                   "on, and not the one the point is judged on afterwards)")
    p.add_argument("--population", choices=("pediatric",), default="pediatric")
    p.add_argument("--max-age", type=float, default=6.0,
                   help="the point applies to patients younger than this many years (default 6: Kermany's films "
                        "are of children aged 1 to 5)")
    p.add_argument("--min-sensitivity", type=float, default=0.90)
    p.add_argument("--out", help="write a copy of the package here instead of changing --model in place")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--max-images", type=int)
    return p


def main(args: argparse.Namespace) -> int:
    from triage_node.inference.model import AgeOperatingPoint, load_model, verify_package

    if args.threads:
        torch.set_num_threads(args.threads)
    if not 0.0 < args.min_sensitivity <= 1.0 or args.max_age <= 0:
        raise SystemExit("--min-sensitivity must be in (0, 1] and --max-age > 0")
    model = load_model(args.model, device="cpu")
    ns = argparse.Namespace(image_labels=args.image_labels, boxes=None, split=args.split, rsna_labels=None,
                            images=None, max_images=args.max_images)
    items = read_items(ns)
    if not items:
        raise SystemExit("no films to calibrate on (check --image-labels and --split)")
    y = np.array([it.label for it in items])
    p = np.array([r.probability for r in run(model, items, ages=[0.0] * len(items))])  # the pediatric gate, if any
    try:
        chosen = choose_threshold(y, p, args.min_sensitivity)
    except ValueError as e:
        raise SystemExit(f"calibrate: {e}") from None
    own = model.pediatric if model.pediatric is not None and model.pediatric.gate is not None else None
    point = AgeOperatingPoint(  # a package with a pediatric gate of its own keeps it: the films were scored by it
        args.population, chosen["threshold"], args.max_age,
        rule=f"highest accuracy with sensitivity >= {args.min_sensitivity:g} on the calibration films",
        calibration={"image_labels": str(args.image_labels), "split": args.split, "date": time.strftime("%Y-%m-%d"),
                     **{k: chosen[k] for k in ("n", "positives", "sensitivity", "specificity", "accuracy")}},
        gate=own.gate if own else None, gate_arch=own.gate_arch if own else "")
    target = Path(args.model)
    if args.out:
        target = Path(args.out)
        if target.resolve() != Path(args.model).resolve():
            shutil.copytree(args.model, target, dirs_exist_ok=True)
    cfg = verify_package(target)
    cfg["thresholds"]["gate_pediatric"] = point.settings()
    (target / "model.json").write_text(json.dumps(cfg, indent=2) + "\n")
    load_model(target, device="cpu")  # the package still loads, with the new point
    print(f"{args.population} operating point (age < {args.max_age:g} y): threshold {chosen['threshold']:.4f} on "
          f"{chosen['n']} films ({chosen['positives']} pos): sens {chosen['sensitivity']:.3f}  spec "
          f"{chosen['specificity']:.3f}  acc {chosen['accuracy']:.3f}; adult point {model.threshold:.4f} gives acc "
          f"{operating_point(y, p, model.threshold)['accuracy']:.3f}; wrote {target / 'model.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
