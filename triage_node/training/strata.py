"""AUC by source and within view x source strata, for ``evaluate`` and ``cv-report``.

A model that learned which archive, scanner or view a film came from scores well overall and near chance within
each source (Zech et al. 2018; DeGrave et al. 2021): the overall AUC cannot show it, the strata can. A film's source
is its CSV's ``source`` or ``source_repo`` column (``nih_clean`` names the public repository each film came from),
else the dataset's name (the CSV's folder). A stratum with fewer than ``MIN_PER_CLASS`` films of either class is
reported with its counts and no AUC (``auc: null``): an AUC of 3 positives against 2 negatives is noise.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from triage_node.inference.gate import roc_auc
from triage_node.training.auc import bootstrap_auc

MIN_PER_CLASS = 5
SOURCE_COLUMNS = ("source", "source_repo")


def read_sources(spec: str | Path, keys: Sequence[str], default: str) -> list[str]:
    """The source of each film ``keys`` names in the ``path,label`` CSV ``spec`` (``labels.csv[:weight]``): its
    ``source`` / ``source_repo`` column, else ``default`` (the dataset's name). Keys as ``images.read_source`` makes
    them (``image_id``, else the path's stem)."""
    from triage_node.training.images import parse_spec

    path, _ = parse_spec(str(spec))
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        column = next((c for c in SOURCE_COLUMNS if c in (reader.fieldnames or ())), None)
        if column is None:
            return [default] * len(keys)
        by_key = {r.get("image_id") or Path(r.get("path") or r.get("file") or "").stem: (r[column] or "").strip()
                  for r in reader}
    return [by_key.get(k) or default for k in keys]


def stratum(y: npt.ArrayLike, p: npt.ArrayLike, seed: int = 0) -> dict:
    """n, positives, negatives; AUC with its bootstrap 95 % CI when both classes have ``MIN_PER_CLASS`` films, else
    ``auc``/``auc_ci95`` None and a note."""
    y = np.asarray(y).astype(bool)
    pos, neg = int(y.sum()), int((~y).sum())
    out: dict = {"n": pos + neg, "positives": pos, "negatives": neg}
    if min(pos, neg) < MIN_PER_CLASS:
        return out | {"auc": None, "auc_ci95": None, "note": f"fewer than {MIN_PER_CLASS} films of a class"}
    return out | {"auc": roc_auc(y, p), "auc_ci95": list(bootstrap_auc(y, np.asarray(p, np.float64), seed=seed))}


def strata(y: npt.ArrayLike, p: npt.ArrayLike, sources: Sequence[str], views: Sequence[str] | None = None,
           seed: int = 0) -> dict:
    """``{"by_source": {source: stratum}, "by_view_source": {view: {source: stratum}}}``; the second only when
    some film has a view (films without one are left out of it)."""
    yv, pv = np.asarray(y), np.asarray(p, np.float64)
    s = np.asarray(list(sources), dtype=object)
    out: dict = {"by_source": {src: stratum(yv[m], pv[m], seed) for src in sorted(set(s)) for m in [s == src]}}
    v = np.asarray(list(views) if views is not None else [""] * len(s), dtype=object)
    named = sorted(set(v) - {""})
    if named:
        out["by_view_source"] = {view: {src: stratum(yv[m], pv[m], seed) for src in sorted(set(s[v == view]))
                                        for m in [(v == view) & (s == src)]} for view in named}
    return out


def _row(label: str, d: dict, width: int) -> str:
    counts = f"{label:<{width}} {d['n']:>5} {d['positives']:>5} {d['negatives']:>5}"
    if d.get("auc") is None:
        return f"{counts}   no AUC ({d.get('note', 'one class')})"
    lo, hi = d["auc_ci95"]
    return f"{counts}   {d['auc']:.3f} [{lo:.3f}, {hi:.3f}]"


def format_strata(result: dict, indent: str = "  ") -> list[str]:
    """The printed table: one line per source, then per view x source."""
    by_view = result.get("by_view_source", {})
    labels = list(result.get("by_source", {})) + [f"{v} / {s}" for v, d in by_view.items() for s in d]
    width = max([len(x) for x in labels] + [len("stratum")])
    lines = [f"{indent}{'stratum':<{width}} {'n':>5} {'pos':>5} {'neg':>5}   AUC [95 % CI]"]
    lines += [f"{indent}{_row(src, d, width)}" for src, d in result.get("by_source", {}).items()]
    lines += [f"{indent}{_row(f'{view} / {src}', d, width)}" for view, row in by_view.items()
              for src, d in row.items()]
    return lines


def probe_films(paths: Sequence[Path], y: npt.ArrayLike, sources: Sequence[str], groups: Sequence[str],
                seed: int = 0, cache_dir: Path | None = Path("var/cache"), name: str = "raw films") -> dict:
    """The shortcut probe (``training.probe``) on the films a model was scored on: the out-of-fold AUC (with its
    CI) of a logistic regression from model-free statistics of each film (image, header, source, patient-ID
    stratum) to the label, grouped by patient. Reported beside the model's AUC: a model's AUC not clearly above the
    probe's says nothing of skill."""
    from triage_node.training import probe

    records = probe.film_records(list(paths), list(sources), list(groups), cache_dir=cache_dir)
    return probe.shortcut_probe(records, y, list(groups), seed=seed, name=name)
