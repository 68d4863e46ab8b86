"""Write a model package's reference profile (input statistics + validation scores) for the drift monitor.

    .venv/bin/python scripts/reference_profile.py --model models/demo \\
        --image-labels ../shared/data/nih_adult/labels.csv --split models/demo/split.json:nih_adult:train,val \\
        --score-split models/demo/split.json:nih_adult:test --out models/demo/reference_profile.json

Statistics (``inference.filmstats``) of the films of ``--split`` (the package's training and validation films),
computed as the node computes them (``dicom_io.pixels``, the age from the header as ``triage_node.age`` reads it);
scores of the films of ``--score-split`` (films the package did not train on) by the package at each film's
operating point, for the output reference (flagged rate, score bins). ``monitoring.profile.build_reference_profile``
builds the profile; a training run calls it the same way at packaging time.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from triage_node import dicom_io
from triage_node.age import read_age
from triage_node.inference import filmstats
from triage_node.monitoring.profile import build_reference_profile


def films(csv_path: Path, split: str | None) -> list[Path]:
    """Paths of the CSV's films, restricted to ``SPLIT_JSON:SOURCE:SIDE[,SIDE]`` (ids in the ``image_id`` column)."""
    rows = list(csv.DictReader(open(csv_path)))
    if split:
        f, source, sides = split.split(":")
        doc = json.loads(Path(f).read_text())[source]
        keep = {i for side in sides.split(",") for i in doc.get(side, [])}
        rows = [r for r in rows if r.get("image_id") in keep]
    return [csv_path.parent / r["path"] for r in rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--image-labels", required=True, type=Path)
    ap.add_argument("--split", help="SPLIT_JSON:SOURCE:SIDE[,SIDE] of the profiled films (default: all)")
    ap.add_argument("--score-split", help="SPLIT_JSON:SOURCE:SIDE of the films scored for the output reference")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    stats = []
    for p in films(args.image_labels, args.split):
        ds = dicom_io.read(p)
        stats.append(filmstats.image_statistics(dicom_io.pixels(ds))
                     | filmstats.header_statistics(ds, read_age(ds).years))
    scores: list[float] = []
    thresholds: list[float] = []
    if args.score_split:
        from triage_node.inference.model import load_model

        model = load_model(args.model, device="cpu")
        for p in films(args.image_labels, args.score_split):
            ds = dicom_io.read(p)
            pred = model.predict([dicom_io.pixels(ds)], ages=[read_age(ds).years])[0]
            scores.append(pred.probability)
            thresholds.append(pred.threshold)
    source = f"{args.image_labels} {args.split or 'all'}; scores: {args.score_split or 'none'}"
    meta = json.loads((Path(args.model) / "model.json").read_text())
    prof = build_reference_profile(stats, source=source, package=f"{meta['name']} {meta['version']}")
    if scores:  # only the scored films' scores count for the output reference
        out = build_reference_profile([{}] * len(scores), scores=scores, threshold=thresholds)["outputs"]
        prof["outputs"] = {**out, "source": args.score_split}
    args.out.write_text(json.dumps(prof, indent=1) + "\n")
    print(f"{prof['films']} films profiled" + (f", {len(scores)} scored (flagged rate "
                                               f"{prof['outputs']['flagged_rate']:.3f})" if scores else "")
          + f": {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
