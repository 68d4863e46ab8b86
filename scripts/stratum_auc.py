"""AUC (95 % bootstrap CI) of `triage-node evaluate` reports on the films of an NIH patient-number range.

    .venv/bin/python scripts/stratum_auc.py --labels ../shared/data/nih_adult/labels.csv --patients 1280:3970 \\
        var/eval/new-nih_adult-test [more report folders]

nih_adult's No Finding films all come from NIH patients 1280-3970; within that range the label is less confounded
with the patient-number slice (not with sharpness: see the shortcut probe), so the range is a floor check.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from triage_node.inference.gate import roc_auc
from triage_node.training.evaluate import bootstrap_auc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labels", required=True, help="labels.csv with image_id and nih_patient_id")
    p.add_argument("--patients", required=True, metavar="LO:HI", help="inclusive NIH patient-number range")
    p.add_argument("reports", nargs="+", type=Path)
    a = p.parse_args()
    lo, hi = (int(v) for v in a.patients.split(":"))
    with open(a.labels, newline="") as f:
        patient = {r["image_id"]: int(r["nih_patient_id"]) for r in csv.DictReader(f)}
    for rep in a.reports:
        with open(rep / "per_image.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if lo <= patient.get(r["key"], -1) <= hi]
        y = np.array([int(r["label"]) for r in rows])
        s = np.array([float(r["probability"]) for r in rows])
        ci = bootstrap_auc(y, s)
        out = {"report": str(rep), "patients": a.patients, "n": len(y), "positives": int(y.sum()),
               "auc": roc_auc(y, s), "auc_ci95": ci}
        (rep / f"stratum_{lo}_{hi}.json").write_text(json.dumps(out, indent=1) + "\n")
        print(f"{rep}: patients {lo}-{hi}: n {len(y)} ({int(y.sum())} pos) AUC {out['auc']:.3f} "
              f"[{ci[0]:.3f}, {ci[1]:.3f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
