"""A worked drift episode and validation: a "site" whose films the model was not trained on, through the node's own
analysis, recorded as the inference worker records them; then ``status`` and ``validate`` read that trail.

    .venv/bin/python scripts/monitoring_demo.py --image-labels ../shared/data/nih_clean/labels.csv \\
        --out var/monitoring-demo
    .venv/bin/triage-node status --config var/monitoring-demo/node.toml
    .venv/bin/triage-node validate --config var/monitoring-demo/node.toml \\
        --truth var/monitoring-demo/truth.csv --out var/monitoring-demo/validation

Each film goes through ``pipeline.analyze`` (decode, model, the input statistics, the site point if any) exactly as
the inference worker calls it, and its ``analysed`` audit line carries the same fields; only the C-STORE, the queue
and the results are left out (docs/monitoring.md). ``truth.csv`` holds the films' labels by SOP Instance UID.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from triage_node import config, dicom_io, pipeline
from triage_node.audit import Audit


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-labels", required=True, type=Path, help="path,label CSV of DICOM films")
    ap.add_argument("--model", default="", help="model package (default: the shipped demo model)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--max", type=int, default=0, help="at most this many films (0: all)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    toml = args.out / "node.toml"
    toml.write_text(f'audit_log = "{(args.out / "audit.jsonl").resolve()}"\n[spool]\ndirectory = '
                    f'"{(args.out / "spool").resolve()}"\n[model]\npath = "{args.model}"\nsite_operating_point = '
                    f'"{(args.out / "site_operating_point.json").resolve()}"\n')
    cfg = config.load(toml)
    cfg = replace(cfg, outputs=replace(cfg.outputs, sc=False))
    audit = Audit.from_config(cfg)
    rows = list(csv.DictReader(open(args.image_labels)))[: args.max or None]
    with open(args.out / "truth.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["sop_instance_uid", "label"])
        for i, r in enumerate(rows):
            path = args.image_labels.parent / r["path"]
            ds = dicom_io.read(path, header_only=True)
            sop = str(ds.SOPInstanceUID)
            stats: dict = {}
            pred = pipeline.analyze(path, cfg, stats_out=stats)
            audit.record("received", sop_instance_uid=sop, study_instance_uid=str(ds.StudyInstanceUID),
                         accession=str(ds.get("AccessionNumber", "") or ""))
            audit.record("analysed", probability=round(pred.probability, 4), positive=pred.positive,
                         boxes=len(pred.detections), model=pred.model.label, threshold=round(pred.threshold, 6),
                         operating_point=pred.operating_point, stats=stats, sop_instance_uid=sop)
            out.writerow([sop, r["label"]])
            if (i + 1) % 50 == 0:
                print(f"{i + 1} films", flush=True)
    print(f"{len(rows)} films recorded in {cfg.audit_log}; next:\n"
          f"  triage-node status --config {toml}\n"
          f"  triage-node validate --config {toml} --truth {args.out / 'truth.csv'} --out {args.out / 'validation'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
