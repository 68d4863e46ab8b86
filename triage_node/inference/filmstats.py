"""Model-free statistics of one film: what a shortcut can read, and what drifts when a site's films change.

Two kinds, both cheap and computed from what a worker already holds after decoding (no second decode):

- :func:`image_statistics`: numbers from the windowed pixels (``dicom_io.pixels``: 2-D float32 in [0, 1]) --
  brightness (mean, percentiles), spread, the saturated fraction, sharpness (mean absolute Laplacian at a fixed
  scale) and a noise level (median absolute Laplacian at that scale, a robust estimate that flat regions dominate).
- :func:`header_statistics`: what the header says of the acquisition (size, spacing, bits, photometric
  interpretation, transfer syntax, manufacturer, model, view) and the patient's age band.

The same functions serve the shortcut probe of training and evaluation (``training.probe``: how well these numbers
alone predict the label) and the node's input-drift monitor (the reference profile in a model package against a
site's recent films). Sharpness and noise are measured on the film reduced (area average) to ``SCALE`` pixels on
its longer side, so a 3000 px DX and a 1024 px CR film are compared at one scale.
"""

from __future__ import annotations

import numpy as np

SCALE = 256
IMAGE_STATISTICS = ("mean", "std", "p05", "p25", "p50", "p75", "p95", "saturated", "sharpness", "noise")
NUMERIC_HEADER_STATISTICS = ("rows", "columns", "pixel_spacing", "bits_stored")
CATEGORICAL_HEADER_STATISTICS = ("photometric", "transfer_syntax", "manufacturer", "model_name", "view", "age_band")
AGE_BANDS = ((6.0, "0-5"), (18.0, "6-17"), (40.0, "18-39"), (65.0, "40-64"), (float("inf"), "65+"))


def reduce_to(img: np.ndarray, scale: int = SCALE) -> np.ndarray:
    """Area-average reduction of a 2-D image so its longer side is at most ``scale`` (integer factor, exact
    block means; an image already that small is returned as float32).

    The block sums are accumulated from ``f`` row-strided then ``f`` column-strided views (contiguous rows first:
    ~0.6 ms for 1024 px, a sixth of a reshape-mean)."""
    a = np.asarray(img, np.float32)
    f = max(1, int(np.ceil(max(a.shape) / scale)))
    if f == 1:
        return a
    h, w = (a.shape[0] // f) * f, (a.shape[1] // f) * f
    rows = a[0:h:f, :w].copy()
    for i in range(1, f):
        rows += a[i:h:f, :w]
    acc = rows[:, 0::f].copy()
    for j in range(1, f):
        acc += rows[:, j::f]
    acc *= 1.0 / (f * f)
    return acc


def _laplacian(a: np.ndarray) -> np.ndarray:
    """|4x - up - down - left - right| on the interior."""
    return np.abs(4 * a[1:-1, 1:-1] - a[:-2, 1:-1] - a[2:, 1:-1] - a[1:-1, :-2] - a[1:-1, 2:])


_LEVELS = 4096  # quantile resolution of the brightness statistics (1/4096 of the [0, 1] range)


def image_statistics(img: np.ndarray, scale: int = SCALE) -> dict[str, float]:
    """Brightness, spread, saturation, sharpness and noise of a windowed film (2-D, values in [0, 1]).

    Brightness (mean, std, percentiles, saturated fraction) comes from a 4-strided subsample, the percentiles
    from its 4096-level histogram; sharpness (mean absolute Laplacian) and noise (its median) from the film
    area-reduced to ``scale`` px on its longer side. About 1.5 ms for a 1024 px film on one core.
    """
    a = np.asarray(img)
    if a.ndim != 2 or min(a.shape) < 3:
        raise ValueError(f"expected a 2-D image of at least 3 x 3 pixels, got shape {a.shape}")
    sub = np.ascontiguousarray(a[::4, ::4] if min(a.shape) >= 64 else a, np.float32)  # one copy: faster reads
    levels = np.clip(sub * (_LEVELS - 1) + 0.5, 0, _LEVELS - 1).astype(np.int32).ravel()
    cdf = np.cumsum(np.bincount(levels, minlength=_LEVELS)) / levels.size
    q = np.searchsorted(cdf, (0.05, 0.25, 0.50, 0.75, 0.95)) / (_LEVELS - 1)
    lap = _laplacian(reduce_to(a, scale)).ravel()
    half = lap.size // 2
    noise = float(np.partition(lap, half)[half]) if lap.size else 0.0
    mean = float(sub.mean())
    sat = float(((sub <= 1 / 255) | (sub >= 254 / 255)).mean())
    return {"mean": mean, "std": float(sub.std()),
            "p05": float(q[0]), "p25": float(q[1]), "p50": float(q[2]), "p75": float(q[3]), "p95": float(q[4]),
            "saturated": sat, "sharpness": float(lap.mean()), "noise": noise}


def age_band(age_years: float | None) -> str:
    """``0-5``, ``6-17``, ``18-39``, ``40-64``, ``65+`` or ``unknown``."""
    if age_years is None or not np.isfinite(age_years) or age_years < 0:
        return "unknown"
    return next(name for limit, name in AGE_BANDS if age_years < limit)


def header_statistics(ds, age_years: float | None = None) -> dict[str, float | str]:
    """What a film's header says of its acquisition (a pydicom Dataset; absent values are NaN or ``""``)."""

    def num(v) -> float:
        try:
            return float(v)
        except (TypeError, ValueError):
            return float("nan")

    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    meta = getattr(ds, "file_meta", None)
    return {"rows": num(ds.get("Rows")), "columns": num(ds.get("Columns")),
            "pixel_spacing": num(spacing[0]) if spacing else float("nan"),
            "bits_stored": num(ds.get("BitsStored")),
            "photometric": str(ds.get("PhotometricInterpretation", "") or ""),
            "transfer_syntax": str(getattr(meta, "TransferSyntaxUID", "") or ""),
            "manufacturer": str(ds.get("Manufacturer", "") or "").strip(),
            "model_name": str(ds.get("ManufacturerModelName", "") or "").strip(),
            "view": str(ds.get("ViewPosition", "") or "").strip().upper(),
            "age_band": age_band(age_years)}
