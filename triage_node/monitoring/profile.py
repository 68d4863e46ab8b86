"""The reference profile of a model package, and the population stability index (PSI) against it.

A profile is JSON (``reference_profile.json`` in the package, or ``model.json``'s ``reference_profile``)::

    {"format": 1, "films": 501, "source": "...", "created": "2026-12-07T17:00:00Z",
     "numeric": {"mean": {"edges": [e0, ..., ek], "proportions": [p_under, p_1, ..., p_k, p_over],
                          "missing": 0.0}, ...},
     "categorical": {"view": {"PA": 0.61, "AP": 0.39}, ...},
     "outputs": {"films": 98, "flagged_rate": 0.31, "threshold": 0.248,
                 "score": {"edges": [...], "proportions": [...], "missing": 0.0}}}

A numeric statistic's bins are the deciles of the reference films (duplicates merged; a constant statistic gets
one bin), so each holds about a tenth of them, plus an underflow bin (below the smallest reference value) and an
overflow bin (above the largest): a film set resized to half the size falls entirely outside. ``proportions`` has
``len(edges) + 1`` entries, for the values that are not NaN; ``missing`` is the share of NaN (an absent header
value). Categorical values keep the 20 most frequent; the rest count as ``(other)``. No film's own values are
stored: the profile holds shares of bins only. ``outputs`` is optional (scores and threshold given): the flagged
rate and the score distribution over the films profiled, which should be validation films.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..inference.filmstats import CATEGORICAL_HEADER_STATISTICS, IMAGE_STATISTICS, NUMERIC_HEADER_STATISTICS

NUMERIC = IMAGE_STATISTICS + NUMERIC_HEADER_STATISTICS
CATEGORICAL = CATEGORICAL_HEADER_STATISTICS
OTHER = "(other)"
MAX_CATEGORIES = 20
PROFILE_FILE = "reference_profile.json"


def numeric_bins(values: Iterable[float], quantiles: int = 10) -> dict[str, Any]:
    """Bin edges (reference deciles) and the shares of ``values`` in them (see the module docstring)."""
    v = np.asarray(list(values), np.float64)
    finite = v[np.isfinite(v)]
    if not len(finite):
        return {"edges": [], "proportions": [1.0], "missing": 1.0 if len(v) else 0.0}
    edges = np.unique(np.quantile(finite, np.linspace(0, 1, quantiles + 1)))
    if len(edges) == 1:
        edges = np.append(edges, edges[0])
    edges[-1] = np.nextafter(edges[-1], np.inf)  # the largest value in the last inner bin, above it overflow
    hist = np.bincount(np.searchsorted(edges, finite, side="right"), minlength=len(edges) + 1)
    return {"edges": [float(e) for e in edges], "proportions": [float(x) for x in hist / len(finite)],
            "missing": float(1 - len(finite) / len(v))}


def numeric_shares(bins: dict[str, Any], values: Sequence[float]) -> tuple[np.ndarray, int]:
    """Counts of ``values`` in the profile's bins, the NaN count last; and their number."""
    v = np.asarray(values, np.float64)
    finite = v[np.isfinite(v)]
    edges = np.asarray(bins["edges"], np.float64)
    counts = np.bincount(np.searchsorted(edges, finite, side="right"), minlength=len(edges) + 1)
    return np.append(counts, len(v) - len(finite)).astype(np.float64), len(v)


def categorical_counts(values: Iterable[str], keys: Sequence[str]) -> np.ndarray:
    """Counts of ``values`` per key of the profile, values the profile does not know counted as ``(other)``."""
    known = set(keys)
    c = Counter(x if x in known else OTHER for x in (str(v) for v in values))
    return np.array([c.get(k, 0) for k in keys], np.float64)


def psi(ref_shares: Sequence[float], ref_n: int, counts: np.ndarray) -> float:
    """Population stability index sum((a - e) * ln(a / e)) of the window's counts against the reference shares.

    Both sides are smoothed by half a film per bin (``(count + 0.5) / (n + 0.5 * bins)``), so an empty bin costs a
    bounded amount instead of infinity; without drift the PSI of a window of n films is about (bins - 1) / n."""
    counts = np.asarray(counts, np.float64)
    n, b = counts.sum(), len(counts)
    if n <= 0 or b == 0:
        return float("nan")
    ref_n = max(int(ref_n), 1)
    e = (np.asarray(ref_shares, np.float64) * ref_n + 0.5) / (ref_n + 0.5 * b)
    a = (counts + 0.5) / (n + 0.5 * b)
    return float(np.sum((a - e) * np.log(a / e)))


def reference_shares(entry: dict[str, Any]) -> list[float]:
    """A numeric entry's shares in the order of :func:`numeric_shares` (bins of the finite values, then NaN)."""
    keep = 1.0 - float(entry.get("missing", 0.0))
    return [p * keep for p in entry["proportions"]] + [float(entry.get("missing", 0.0))]


def build_reference_profile(stats: list[dict], scores: Sequence[float] | None = None,
                            threshold: float | Sequence[float] | None = None, source: str = "",
                            package: str = "") -> dict:
    """The reference profile of a model package from its training / validation films' statistics.

    Parameters
    ----------
    stats : one dict per film, ``filmstats.image_statistics(img) | filmstats.header_statistics(ds, age)``
        (missing keys count as NaN / ``""``).
    scores : optional, the package's score of each of these films (validation films: the output reference).
    threshold : the operating threshold (one, or one per film) that turns scores into flags.
    source : free text naming the films (e.g. ``"nih_adult train + val, split.json"``).
    package : ``"<model.json name> <version>"``; when given, the node uses the profile only with that package (a
        profile left beside a newer model is refused, not silently compared against).

    Returns
    -------
    dict, JSON-serialisable; write it as ``reference_profile.json`` into the package.
    """
    if not stats:
        raise ValueError("a reference profile needs at least one film's statistics")
    profile: dict[str, Any] = {
        "format": 1, "films": len(stats), "source": source, "package": package,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "numeric": {k: numeric_bins(_num(s.get(k)) for s in stats) for k in NUMERIC},
        "categorical": {},
    }
    for k in CATEGORICAL:
        c = Counter(str(s.get(k, "") or "") for s in stats)
        top = dict(c.most_common(MAX_CATEGORIES))
        rest = sum(c.values()) - sum(top.values())
        shares = {v: n / len(stats) for v, n in top.items()}
        shares[OTHER] = rest / len(stats)
        profile["categorical"][k] = shares
    if scores is not None:
        p = np.asarray(scores, np.float64)
        if len(p) != len(stats):
            raise ValueError(f"{len(p)} scores for {len(stats)} films")
        out: dict[str, Any] = {"films": int(len(p)), "score": numeric_bins(p)}
        if threshold is not None:
            t = np.broadcast_to(np.asarray(threshold, np.float64), p.shape)
            out["flagged_rate"] = float((p >= t).mean())
            out["threshold"] = float(t[0]) if np.all(t == t[0]) else [float(x) for x in t]
        profile["outputs"] = out
    return profile


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def load_reference_profile(model_dir: str | Path | None, path: str | Path = "") -> tuple[dict | None, str]:
    """(profile, where it came from) or (None, why there is none). ``path`` (``monitoring.reference_profile``)
    first, then ``reference_profile.json`` in the package, then ``model.json``'s ``reference_profile``. A profile
    naming another package (``package``) than ``model.json``'s name and version is refused."""
    meta: dict = {}
    if model_dir and (Path(model_dir) / "model.json").is_file():
        try:
            meta = json.loads((Path(model_dir) / "model.json").read_text())
        except (OSError, ValueError):
            meta = {}
    label = f"{meta.get('name', '')} {meta.get('version', '')}".strip()
    found: list[tuple[Any, str]] = []
    candidates = [Path(path)] if path else []
    if model_dir:
        candidates.append(Path(model_dir) / PROFILE_FILE)
    for c in candidates:
        if c.is_file():
            try:
                found.append((json.loads(c.read_text()), str(c)))
            except (OSError, ValueError) as exc:
                return None, f"unreadable reference profile {c}: {exc}"
            break
    if not found and meta.get("reference_profile") is not None:
        found.append((meta["reference_profile"], f"{Path(str(model_dir)) / 'model.json'}:reference_profile"))
    if not found:
        return None, "no reference profile in the model package"
    prof, where = found[0]
    if not _valid(prof):
        return None, f"not a reference profile: {where}"
    if prof.get("package") and label and prof["package"] != label:
        return None, f"reference profile {where} is for {prof['package']}, not {label}"
    return prof, where


def _valid(prof: Any) -> bool:
    return isinstance(prof, dict) and prof.get("format") == 1 and isinstance(prof.get("numeric"), dict)


def validation_rates(model_dir: str | Path | None, profile: dict | None) -> dict[str, Any] | None:
    """The output reference: the profile's ``outputs``, else model.json ``metrics.validation`` (``flagged_rate``,
    ``films``, optional ``score`` bins) when the package reports them; None when neither does."""
    if profile and isinstance(profile.get("outputs"), dict) and "flagged_rate" in profile["outputs"]:
        return profile["outputs"]
    if not model_dir or not (Path(model_dir) / "model.json").is_file():
        return None
    try:
        metrics = json.loads((Path(model_dir) / "model.json").read_text()).get("metrics") or {}
    except (OSError, ValueError):
        return None
    val = metrics.get("validation") if isinstance(metrics, dict) else None
    if isinstance(val, dict) and isinstance(val.get("flagged_rate"), (int, float)) and not math.isnan(
            float(val["flagged_rate"])):
        return val
    return None
