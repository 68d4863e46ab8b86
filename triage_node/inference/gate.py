"""Image-level classifier that gates the detector: below the threshold no boxes are emitted."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

GATE_ARCH = "gatecnn5"
GATE_SIZE = 128


def _conv(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class GateNet(nn.Module):
    """Small VGG-style CNN: stride-2 stem, four conv stages (32..256 ch) with max-pooling, global average pool,
    one logit. Input N x 1 x S x S in [0,1] (S = 128)."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128, 256), convs: tuple[int, ...] = (1, 2, 2, 1)) -> None:
        super().__init__()
        layers = _conv(1, widths[0], stride=2)
        for cin, cout, n in zip(widths[:-1], widths[1:], convs):
            layers += _conv(cin, cout)
            for _ in range(n - 1):
                layers += _conv(cout, cout)
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(widths[-1], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features((x - 0.5) / 0.25)).squeeze(1)


def build_gate(arch: str = GATE_ARCH) -> GateNet:
    if arch != GATE_ARCH:
        raise ValueError(f"unknown gate architecture {arch!r}")
    return GateNet()


def roc_auc(y: npt.ArrayLike, p: npt.ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half)."""
    yb, pf = np.asarray(y).astype(bool), np.asarray(p, np.float64)
    pos, neg = pf[yb], pf[~yb]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    allp = np.concatenate([pos, neg])[order]
    ranks = np.empty(len(allp))
    i = 0
    while i < len(allp):  # average ranks over ties
        j = i
        while j + 1 < len(allp) and allp[j + 1] == allp[i]:
            j += 1
        ranks[i:j + 1] = (i + j) / 2 + 1
        i = j + 1
    r = np.empty(len(allp))
    r[order] = ranks
    return float((r[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def youden_threshold(y: npt.ArrayLike, p: npt.ArrayLike) -> float:
    """Threshold maximising sensitivity + specificity - 1 (midpoint between neighbouring scores)."""
    yb, pf = np.asarray(y).astype(bool), np.asarray(p, np.float64)
    cand = np.unique(pf)
    best, best_t = -1.0, 0.5
    for t in cand:
        j = (pf[yb] >= t).mean() + (pf[~yb] < t).mean() - 1
        if j > best:
            best, best_t = j, t
    lower = cand[cand < best_t]
    return float((best_t + lower.max()) / 2) if len(lower) else float(best_t)
