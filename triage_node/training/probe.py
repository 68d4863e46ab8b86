"""The shortcut probe: how well model-free statistics of each film alone predict the label.

If brightness, sharpness, size, view or the patient-ID range of the films predict the label, a network finds them
before it finds pneumonia (Zech et al. 2018; DeGrave et al. 2021). The probe fits a cross-validated logistic
regression (scikit-learn; folds grouped by patient) to the statistics of ``inference.filmstats`` and reports the
out-of-fold AUC with a bootstrap CI. Two probes go beside every training and evaluation result:

- ``raw``: the films as received -- image statistics of the decoded film, its header (size, spacing, bits,
  photometric interpretation, transfer syntax, manufacturer, model, view, age band), its source and patient-ID
  stratum. What any model could read if nothing removed it.
- ``inputs``: image statistics of what the network actually sees (after resizing and harmonisation). What the
  preprocessing leaves for the network to shortcut on. Header fields are not in it: preprocessing cannot change
  them, and the ``raw`` probe already shows them.

An AUC near 0.5 says the statistics carry nothing of the label; above ~0.65 a model's figures on that data are
suspect (``WARN_AUC``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from triage_node.inference.filmstats import (
    CATEGORICAL_HEADER_STATISTICS,
    IMAGE_STATISTICS,
    NUMERIC_HEADER_STATISTICS,
    header_statistics,
    image_statistics,
)

log = logging.getLogger(__name__)
WARN_AUC = 0.65
RAW_NUMERIC = IMAGE_STATISTICS + NUMERIC_HEADER_STATISTICS
RAW_CATEGORICAL = CATEGORICAL_HEADER_STATISTICS + ("source", "id_stratum")
ID_STRATUM = 2500  # NIH patient numbers per stratum (nih_adult's No Finding films are patients 1280-3970)


def id_stratum(group: str, width: int = ID_STRATUM) -> str:
    """A coarse stratum of a numeric patient ID (``"p0"``: 0-2499, ...); ``""`` when the ID holds no number."""
    m = re.search(r"\d+", str(group))
    return f"p{int(m.group()) // width}" if m else ""


def film_record(path: Path) -> dict:
    """Image and header statistics of one film as the node decodes it (DICOM), or as training reads a PNG/JPEG."""
    from triage_node import dicom_io
    from triage_node.training.data import load_image

    if path.suffix.lower() in (".dcm", ".dicom", ""):
        ds = dicom_io.read(path)
        img = dicom_io.pixels(ds)
        return image_statistics(img) | header_statistics(ds, dicom_io.patient_age_years(ds))
    img = load_image(path)
    return image_statistics(img) | {"rows": float(img.shape[0]), "columns": float(img.shape[1])}


def film_records(paths: Sequence[Path], sources: Sequence[str] | None = None, groups: Sequence[str] | None = None,
                 cache_dir: Path | None = Path("var/cache"), progress: bool = False) -> list[dict]:
    """:func:`film_record` of every film, plus ``source`` and ``id_stratum``; cached (JSON) by the list of paths."""
    from triage_node.inference import filmstats

    stats_code = Path(filmstats.__file__).read_bytes()  # a change of the statistics' definitions is a new cache
    key = hashlib.sha256("\n".join(str(Path(p).resolve()) for p in paths).encode() + stats_code).hexdigest()[:16]
    cache = cache_dir / f"filmstats-{key}.json" if cache_dir else None
    recs: list[dict] | None = None
    if cache is not None and cache.exists():
        recs = json.loads(cache.read_text())
    if recs is None or len(recs) != len(paths):
        from tqdm import tqdm

        recs = [film_record(Path(p)) for p in tqdm(paths, desc="film statistics", disable=not progress)]
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(recs))
            tmp.replace(cache)
    out = []
    for i, r in enumerate(recs):
        r = dict(r)
        r["source"] = sources[i] if sources is not None else ""
        r["id_stratum"] = id_stratum(groups[i]) if groups is not None else ""
        out.append(r)
    return out


def network_inputs(paths: Sequence[Path], size: int, method: str) -> np.ndarray:
    """The network's inputs for these films (N x size x size float32): decoded and resized as training caches them
    (``images.decode``), then harmonised as the worker harmonises them (``preprocess.harmonise``)."""
    import torch

    from triage_node.inference.preprocess import harmonise
    from triage_node.training.images import decode

    if not len(paths):
        return np.zeros((0, size, size), np.float32)
    x = torch.from_numpy(np.stack([decode(Path(p), size) for p in paths]))[:, None].float() / 255
    return harmonise(x, method)[:, 0].numpy()


def input_records(images: np.ndarray) -> list[dict]:
    """Image statistics of the network's inputs (N x S x S, uint8 or float in [0, 1])."""
    a = np.asarray(images)
    scale = 255.0 if a.dtype == np.uint8 else 1.0
    return [image_statistics(np.asarray(im, np.float32) / scale) for im in a]


def _design(records: Sequence[dict], numeric: Sequence[str], categorical: Sequence[str]) -> np.ndarray:
    """An object array: the numeric columns (float, NaN where absent), then the categorical ones (str)."""
    return np.array([[float(r.get(k, np.nan)) for k in numeric] + [str(r.get(k, "")) for k in categorical]
                     for r in records], dtype=object)


def shortcut_probe(records: Sequence[dict], y: npt.ArrayLike, groups: Sequence[str] | None = None,
                   numeric: Sequence[str] | None = None, categorical: Sequence[str] | None = None,
                   folds: int = 5, seed: int = 0, name: str = "") -> dict:
    """Out-of-fold AUC (with a 95 % bootstrap CI) of a logistic regression from the statistics to the label.

    ``numeric`` / ``categorical``: the features (default: everything of the ``raw`` probe found in the records).
    Folds are grouped by ``groups`` (patients) and stratified by label."""
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    from triage_node.inference.gate import roc_auc
    from triage_node.training.evaluate import bootstrap_auc

    yv = np.asarray(y, int)
    keys = set().union(*(r.keys() for r in records)) if records else set()
    num = [k for k in (numeric if numeric is not None else RAW_NUMERIC) if k in keys]
    cat = [k for k in (categorical if categorical is not None else RAW_CATEGORICAL) if k in keys]
    n_pos, n_neg = int(yv.sum()), int((1 - yv).sum())
    out = {"name": name, "n": len(yv), "positives": n_pos, "features": num + cat, "folds": folds,
           "auc": float("nan"), "ci95": [float("nan"), float("nan")], "model": "logistic regression (C=1), "
           "standardised numeric + one-hot categorical features, out-of-fold by patient"}
    if min(n_pos, n_neg) < folds or not (num or cat):
        out["note"] = "too few films of one class (or no feature) to probe"
        return out
    x = _design(records, num, cat)
    inum, icat = list(range(len(num))), list(range(len(num), len(num) + len(cat)))
    pre = ColumnTransformer([("num", make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True),
                                                   StandardScaler()), inum),
                             ("cat", OneHotEncoder(handle_unknown="ignore"), icat)])
    clf = make_pipeline(pre, LogisticRegression(C=1.0, max_iter=2000))
    g = np.asarray(groups if groups is not None else np.arange(len(yv)).astype(str))
    oof = np.zeros(len(yv))
    for tr, te in StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, yv, g):
        if len(set(yv[tr])) < 2:
            oof[te] = yv[tr].mean()
            continue
        clf.fit(x[tr], yv[tr])
        oof[te] = clf.predict_proba(x[te])[:, 1]
    clf.fit(x, yv)  # the full fit: which statistics carry the label, by standardised coefficient
    names = list(num) + ([f"{cat[j]}={v}" for j, vs in enumerate(clf[0].named_transformers_["cat"].categories_)
                          for v in vs] if cat else [])
    coef = clf[-1].coef_[0]
    top = np.argsort(-np.abs(coef))[:5]
    out.update(auc=roc_auc(yv, oof), ci95=list(bootstrap_auc(yv, oof, seed=seed)),
               top_features={names[i]: round(float(coef[i]), 3) for i in top})
    return out


def input_probe(images: np.ndarray, y: npt.ArrayLike, groups: Sequence[str] | None = None, **kw) -> dict:
    """The ``inputs`` probe: :func:`shortcut_probe` on the image statistics of the network's inputs."""
    return shortcut_probe(input_records(images), y, groups, numeric=IMAGE_STATISTICS, categorical=(), **kw)


def format_probe(result: dict) -> str:
    """One line: ``probe <name>: AUC 0.62 [0.57, 0.67] (n 599; top: sharpness -0.8, ...)`` and a warning."""
    lo, hi = result.get("ci95", [float("nan")] * 2)
    top = ", ".join(f"{k} {v:+.2f}" for k, v in list((result.get("top_features") or {}).items())[:3])
    line = (f"shortcut probe {result.get('name') or ''}: AUC {result['auc']:.3f} [{lo:.3f}, {hi:.3f}] "
            f"(n {result['n']}, {result['positives']} positive; model-free statistics only"
            f"{'; strongest: ' + top if top else ''})")
    if result.get("note"):
        line += f" -- {result['note']}"
    if result["auc"] > WARN_AUC:
        line += (f"\n  WARNING: model-free statistics predict the label (AUC > {WARN_AUC}): a model can score well "
                 "on these films without seeing pneumonia; do not read its figures here as skill")
    return line


def training_probes(tr: Sequence, method: str, seed: int = 0) -> dict:
    """The shortcut probe on the training films of every source and of the pool: ``raw`` (the films as received:
    image + header statistics, source, patient-ID stratum) and ``inputs`` (image statistics of the harmonised
    network inputs). Printed, with a loud warning when the inputs probe exceeds ``WARN_AUC``."""
    import torch

    from triage_node.inference.preprocess import harmonise

    out: dict = {"harmonise": method, "raw": {}, "inputs": {}}
    recs, ys, gs, imgs = [], [], [], []
    for s in tr:
        if not len(s):
            continue
        r = film_records(s.paths, [s.name] * len(s), s.groups)
        x = harmonise(torch.from_numpy(s.images)[:, None].float() / 255, method)[:, 0].numpy()
        out["raw"][s.name] = shortcut_probe(r, s.labels, s.groups, seed=seed, name=f"{s.name} raw films")
        out["inputs"][s.name] = input_probe(x, s.labels, s.groups, seed=seed, name=f"{s.name} network inputs")
        recs += r
        ys.append(s.labels)
        gs += [f"{s.name}:{g}" for g in s.groups]
        imgs.append(x)
    if len(ys) > 1:
        y = np.concatenate(ys)
        out["raw"]["pool"] = shortcut_probe(recs, y, gs, seed=seed, name="training pool raw films")
        out["inputs"]["pool"] = input_probe(np.concatenate(imgs), y, gs, seed=seed,
                                              name="training pool network inputs")
    for kind in ("raw", "inputs"):
        for res in out[kind].values():
            print(format_probe(res), flush=True)
    worst = max((r["auc"] for r in out["inputs"].values() if r["auc"] == r["auc"]), default=float("nan"))
    if worst > WARN_AUC:
        log.warning("SHORTCUT: model-free statistics of the network's inputs predict the label with AUC %.3f "
                    "(> %.2f) on the training films; harmonise the inputs (--harmonise) or change the data", worst,
                    WARN_AUC)
    return out
