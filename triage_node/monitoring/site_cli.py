"""``triage-node calibrate --site``: a site operating point from this site's validated films.

    triage-node calibrate --site --config node.toml --truth labels.csv --min-sensitivity 0.90 [--point adult]

The films are those the node recorded (audit trail) and the ground truth names (the inputs of ``validate``),
scored by the configured package at the chosen point (``adult``: films judged at the package's adult point,
including those without a readable age; ``pediatric``; ``all``). The threshold is the highest whose sensitivity
on them is >= ``--min-sensitivity`` (the best specificity at that sensitivity). It is written to
``[model] site_operating_point`` (never into the package), with the package's SHA-256, who and when; audited
(``site_operating_point``). Workers pick it up at their next film, and the SR's Algorithm Parameters name it
(``operating_point=site <time>``). ``--remove`` deletes it (audited).
"""

from __future__ import annotations

import argparse
import getpass
import time
from pathlib import Path

import numpy as np

from .. import config as config_mod
from ..audit import Audit
from ..validate.cli import collect
from ..validate.report import join, recorded_films
from ..validate.truth import Truth
from . import site
from .stats import wilson

_POINT_FILMS = {"adult": ("", "adult", "age unknown"), "pediatric": ("pediatric",)}


def choose_threshold(y: np.ndarray, p: np.ndarray, min_sensitivity: float) -> dict:
    """The highest threshold (so the best specificity) whose sensitivity on the films is >= ``min_sensitivity``;
    the films' own scores are the candidates. Not "the most accurate" (the rule of the pediatric point): accuracy
    depends on the site's prevalence, and at 60 % positives it prefers flagging everything. Raises ValueError
    without positives or negatives."""
    y, p = np.asarray(y).astype(bool), np.asarray(p, np.float64)
    if y.all() or not y.any():
        raise ValueError("a site operating point needs validated positive and negative films")
    t = float(np.unique(p)[0])  # the lowest score flags every film: sensitivity 1.0
    for cand in np.unique(p)[::-1]:  # highest first
        if float((p[y] >= cand).mean()) >= min_sensitivity:
            t = float(cand)
            break
    tp, tn = int((p[y] >= t).sum()), int((p[~y] < t).sum())
    return {"threshold": t, "n": int(len(y)), "positives": int(y.sum()), "sensitivity": tp / int(y.sum()),
            "sensitivity_ci95": list(wilson(tp, int(y.sum()))), "specificity": tn / int((~y).sum()),
            "specificity_ci95": list(wilson(tn, int((~y).sum()))), "accuracy": float(((p >= t) == y).mean())}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="triage-node calibrate --site",
                                description="Choose a site operating point on this site's validated films",
                                add_help=add_help)
    p.add_argument("--site", action="store_true", required=True)
    p.add_argument("--config", help="the node's TOML configuration")
    p.add_argument("--audit", help="audit trail to read instead of the configured one")
    p.add_argument("--truth", action="append", default=[], help="CSV: sop_instance_uid or accession_number, label")
    p.add_argument("--oru", help="folder of HL7 ORU^R01 reports")
    p.add_argument("--min-sensitivity", type=float, default=0.90)
    p.add_argument("--point", choices=("adult", "pediatric", "all"), default="adult",
                   help="the package's operating point whose films it replaces (default adult)")
    p.add_argument("--min-films", type=int, default=50, help="refuse with fewer validated films (default 50)")
    p.add_argument("--by", help="who calibrates (audited; default: the login name)")
    p.add_argument("--remove", action="store_true", help="remove the site operating point")
    return p


def main(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    audit = Audit.from_config(cfg)
    who, when = args.by or getpass.getuser(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path = Path(cfg.model.site_operating_point or "var/site/operating_point.json")
    if args.remove:
        path.unlink(missing_ok=True)
        audit.record("site_operating_point", action="removed", by=who, path=str(path))
        print(f"site operating point removed ({path}); the package's points apply")
        return 0
    if not 0 < args.min_sensitivity <= 1:
        raise SystemExit("--min-sensitivity must be in (0, 1]")
    truth = Truth()
    sources = collect(truth, args)
    if not sources:
        raise SystemExit("give ground truth: --truth CSV and/or --oru FOLDER")
    films, model, _ = recorded_films(args.audit or cfg.audit_log)
    films = [f for f in join(films, truth)
             if args.point == "all" or f.operating_point in _POINT_FILMS[args.point]
             or f.operating_point.startswith("site")]  # judged at an earlier site point: recalibrated
    for e in truth.errors:
        print(f"calibrate --site: {e}")
    if len(films) < args.min_films:
        raise SystemExit(f"calibrate --site: {len(films)} validated film(s) at the {args.point} point of {model}; "
                         f"at least {args.min_films} needed (--min-films)")
    try:
        chosen = choose_threshold(np.array([f.label for f in films]), np.array([f.probability for f in films]),
                                  args.min_sensitivity)
    except ValueError as exc:
        raise SystemExit(f"calibrate --site: {exc}") from None
    rule = f"highest threshold with sensitivity >= {args.min_sensitivity:g} on the site's validated films"
    written = site.write_site_point(cfg, chosen["threshold"], args.point, rule,
                                    {**chosen, "truth": sources, "model": model}, by=who, when=when,
                                    package_label=model)
    audit.record("site_operating_point", action="set", threshold=chosen["threshold"], applies_to=args.point,
                 package_sha256=site.package_sha256(site.model_dir(cfg)), by=who, path=str(written),
                 n=chosen["n"], positives=chosen["positives"], sensitivity=round(chosen["sensitivity"], 4),
                 specificity=round(chosen["specificity"], 4))
    print(f"site operating point ({args.point} films of {model}): threshold {chosen['threshold']:.4f} on "
          f"{chosen['n']} films ({chosen['positives']} pos): sensitivity {chosen['sensitivity']:.3f} "
          f"specificity {chosen['specificity']:.3f}; wrote {written} (by {who}, {when})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
