"""Sensitivity and specificity (Wilson 95 % CIs) of a `triage-node evaluate` report on Kermany films, by the
collection batch their file names carry: normals named ``IM-...`` vs ``NORMAL2-IM-...``, pneumonia ``bacteria`` vs
``virus``. Kermany's test folder was collected apart from its training folder; a point that holds across the
training folder's own batches is a (weak) sign that it survives such a shift.

    .venv/bin/python scripts/kermany_batches.py var/eval/new-kermany-test
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from triage_node.training.auc import wilson


def batch(key: str, label: int) -> str:
    if label == 0:
        return "normal NORMAL2-IM" if key.startswith("NORMAL2") else "normal IM"
    return "pneumonia virus" if "virus" in key else "pneumonia bacteria"


def main() -> int:
    for rep in map(Path, sys.argv[1:]):
        with open(rep / "per_image.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        out = {}
        for b in sorted({batch(r["key"], int(r["label"])) for r in rows}):
            sel = [r for r in rows if batch(r["key"], int(r["label"])) == b]
            right = sum(int(r["positive"]) == int(r["label"]) for r in sel)
            what = "specificity" if b.startswith("normal") else "sensitivity"
            out[b] = {"n": len(sel), what: right / len(sel), "ci95": wilson(right, len(sel))}
            lo, hi = out[b]["ci95"]
            print(f"{rep}: {b}: n {len(sel)} {what} {right / len(sel):.3f} [{lo:.3f}, {hi:.3f}]")
        (rep / "kermany_batches.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
