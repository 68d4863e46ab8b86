"""Lung-region prior: a coverage heatmap of the 9,555 real RSNA boxes; boxes where it is low are suppressed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

STATS_PATH = Path(__file__).resolve().parent.parent / "data" / "rsna_box_stats.json"


class LungPrior:
    """``heat`` is an HxW map in [0,1] over the normalised image square.

    A box keeps its detection when the mean of the map inside it is >= ``min_mean``; its score is multiplied by
    ``mean ** power`` (``power=0``: gate only).
    """

    def __init__(self, heat: np.ndarray, min_mean: float = 0.15, power: float = 0.0) -> None:
        heat = np.asarray(heat, np.float64)
        self.heat = (heat / max(float(heat.max()), 1e-12)).astype(np.float32)
        self.min_mean, self.power = float(min_mean), float(power)
        self._integral = np.pad(self.heat.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    @classmethod
    def from_box_stats(cls, stats: dict | None = None, **kw) -> LungPrior:
        if stats is None:
            stats = json.loads(STATS_PATH.read_text())
        return cls(np.array(stats["coverage"], np.float32), **kw)

    def box_means(self, boxes_xyxy: np.ndarray, width: float, height: float) -> np.ndarray:
        """Mean prior inside each box (boxes in pixels of an image of ``width`` x ``height``)."""
        b = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)
        gh, gw = self.heat.shape
        x0 = np.clip(np.floor(b[:, 0] / width * gw), 0, gw - 1).astype(int)
        y0 = np.clip(np.floor(b[:, 1] / height * gh), 0, gh - 1).astype(int)
        x1 = np.clip(np.ceil(b[:, 2] / width * gw), x0 + 1, gw).astype(int)
        y1 = np.clip(np.ceil(b[:, 3] / height * gh), y0 + 1, gh).astype(int)
        s = self._integral
        tot = s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0]
        return (tot / ((x1 - x0) * (y1 - y0))).astype(np.float32)

    def apply(self, means: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (keep mask, adjusted scores) for boxes whose prior means are ``means``."""
        means, scores = np.asarray(means, np.float32), np.asarray(scores, np.float32)
        return means >= self.min_mean, scores * np.power(np.clip(means, 1e-6, 1.0), self.power)

    def settings(self) -> dict:
        return {"min_mean": self.min_mean, "power": self.power, "grid": list(self.heat.shape),
                "source": "coverage of the 9,555 boxes in RSNA stage_2_train_labels.csv"}
