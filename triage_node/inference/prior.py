"""Lung-region prior: a coverage heatmap of the 9,555 real RSNA boxes; boxes where it is low are suppressed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

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


class DensityAtlas:
    """Which hemithorax is denser than a normal film's: the side prior of the CAM localiser.

    ``mean`` and ``sd`` are per-pixel statistics of films without a finding (the training split's negatives) at
    the network's input size, each film first standardised by the mean and standard deviation of its own lung
    field (the lung prior >= ``lung_threshold``), so exposure and windowing differences cancel. A film's residual
    ``(standardised film - mean) / sd``, box-smoothed over ``smooth`` pixels, is positive where it is denser (whiter)
    than a normal chest at that place, heart and diaphragm included. Its mean over each half of the lung field says
    which side the opacity is on: consolidation raises density, and the clearer lung, where the plain
    class-activation map often peaked, reads as the *less* dense side. Nothing here is learned from boxes.
    """

    def __init__(self, mean: np.ndarray, sd: np.ndarray, heat: np.ndarray, lung_threshold: float = 0.3,
                 smooth: int = 15, sd_floor: float = 0.05, n_films: int = 0, source: str = "") -> None:
        self.mean = np.asarray(mean, np.float32)
        self.sd = np.asarray(sd, np.float32)
        if self.mean.ndim != 2 or self.mean.shape != self.sd.shape or self.mean.shape[0] != self.mean.shape[1]:
            raise ValueError(f"atlas mean/sd must be equal square maps, got {self.mean.shape} / {self.sd.shape}")
        self.size = int(self.mean.shape[0])
        self.lung_threshold, self.smooth, self.sd_floor = float(lung_threshold), int(smooth), float(sd_floor)
        self.n_films, self.source = int(n_films), source
        self.lung = self.lung_mask(heat, self.size, self.lung_threshold)
        left = np.zeros_like(self.lung)
        left[:, : self.size // 2] = True
        self._halves = (self.lung & left, self.lung & ~left)
        # The side scores are linear in the standardised film: the mean over a half of the box-smoothed residual
        # is sum_p w(p) z(p), with w = the smoothing's adjoint applied to the half's mask / its size. So a film
        # costs one weighted sum per half (S*S x 2), not a 15 x 15 box filter over the whole image.
        k, pad = self.smooth, self.smooth // 2
        ones = torch.ones(1, 1, self.size, self.size)
        cnt = F.avg_pool2d(ones, k, 1, pad, count_include_pad=True) * k * k  # pixels in each window
        ws = []
        for h in self._halves:
            m = torch.from_numpy(h.astype(np.float32))[None, None]
            ws.append((F.avg_pool2d(m / cnt, k, 1, pad, count_include_pad=True) * k * k)[0, 0] / float(h.sum()))
        w = torch.stack(ws, -1)  # S x S x 2
        inv = 1.0 / (torch.from_numpy(self.sd) + self.sd_floor)
        self._a = (w * inv[..., None]).reshape(-1, 2)  # weights on the standardised film
        self._c = (w * (torch.from_numpy(self.mean) * inv)[..., None]).sum((0, 1))  # the atlas mean's share
        self._lung_t = torch.from_numpy(self.lung)

    @staticmethod
    def lung_mask(heat: np.ndarray, size: int, threshold: float) -> np.ndarray:
        """The lung field: the lung prior resized to ``size`` x ``size``, at or above ``threshold``."""
        lung = F.interpolate(torch.from_numpy(np.asarray(heat, np.float32))[None, None], size=(size, size),
                             mode="bilinear", align_corners=False)[0, 0]
        mask = (lung >= threshold).numpy()
        if not mask.any():
            raise ValueError("the lung prior selects no pixel at this threshold")
        return mask

    @staticmethod
    def standardise(x, lung):
        """N x S x S (numpy or torch) -> each film minus its lung-field mean, over its lung-field std."""
        t = torch.as_tensor(x, dtype=torch.float32)
        m = torch.as_tensor(lung, device=t.device)
        v = t[:, m]
        return (t - v.mean(1)[:, None, None]) / (v.std(1, unbiased=False)[:, None, None] + 1e-6)

    @classmethod
    def fit(cls, normals, heat: np.ndarray, lung_threshold: float = 0.3, **kw) -> DensityAtlas:
        """From N x S x S films without a finding, values in [0, 1] as the network sees them."""
        n = torch.as_tensor(normals, dtype=torch.float32)
        if n.ndim != 3 or len(n) < 2:
            raise ValueError(f"need at least 2 films as N x S x S, got {tuple(n.shape)}")
        z = cls.standardise(n, cls.lung_mask(heat, n.shape[-1], lung_threshold))
        return cls(z.mean(0).numpy(), z.std(0, unbiased=False).numpy(), heat, lung_threshold=lung_threshold,
                   n_films=len(n), **kw)

    def sides(self, x) -> np.ndarray:
        """N x 2: mean smoothed residual over the left and right image halves of the lung field (N x 1 x S x S or
        N x S x S in [0, 1], at this atlas's size; torch on any device, or numpy)."""
        t = torch.as_tensor(x, dtype=torch.float32)
        if t.ndim == 4:
            t = t[:, 0]
        if tuple(t.shape[1:]) != (self.size, self.size):
            raise ValueError(f"atlas is {self.size} px, the input is {tuple(t.shape[1:])}")
        dev = t.device
        std = self.standardise(t, self._lung_t.to(dev))
        return (std.reshape(len(std), -1) @ self._a.to(dev) - self._c.to(dev)).cpu().numpy()

    def settings(self) -> dict:
        return {"size": self.size, "lung_threshold": self.lung_threshold, "smooth": self.smooth,
                "sd_floor": self.sd_floor, "films": self.n_films, "source": self.source}
