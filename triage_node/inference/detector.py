"""Torchvision detectors with small from-scratch backbones (no pretrained weights), single-channel input.

``fcos_mnv3l_fpn64`` (the default) is FCOS with a MobileNetV3-Large trunk (weights=None), a 64-channel FPN on the
stride-16 and stride-32 stages plus P6/P7, and 2-conv heads: RSNA boxes are large (median ~220x300 px at 1024), so
a stride-8 level is not needed and the heads stay cheap on CPU. Candidates and their CPU timings are in the card.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torchvision.models import get_model
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

ARCHITECTURES = ("fcos_mnv3l_fpn64", "retinanet_mnv3l_fpn64", "fasterrcnn_mobilenet_v3_large_fpn")
DEFAULT_ARCH = "fcos_mnv3l_fpn64"
NUM_CLASSES = 2  # index 0 unused (torchvision convention), 1 = lung opacity
LABEL = 1
MEAN, STD = [0.5], [0.25]


def _gray_stem(features: nn.Sequential) -> None:
    """Swap the 3-channel stem conv for a 1-channel one (grayscale radiographs; no pretrained weights to keep)."""
    stem = next(iter(features.children()))
    if not isinstance(stem, nn.Sequential) or not isinstance(stem[0], nn.Conv2d):
        raise TypeError(f"unexpected stem {type(stem).__name__}: expected a Sequential starting with a Conv2d")
    conv = stem[0]
    padding = conv.padding if isinstance(conv.padding, str) else _pair(conv.padding)
    stem[0] = nn.Conv2d(1, conv.out_channels, _pair(conv.kernel_size), _pair(conv.stride), padding, bias=False)


def _pair(v: tuple[int, ...]) -> tuple[int, int]:
    """A Conv2d's (h, w) setting: torch stores it as a 2-tuple but annotates it ``tuple[int, ...]``."""
    return v[0], v[1]


def _mnv3_fpn(channels: int) -> BackboneWithFPN:
    trunk = get_model("mobilenet_v3_large", weights=None).features  # BatchNorm, all layers trainable
    _gray_stem(trunk)
    # outputs of blocks 12 (stride 16, 112 ch) and 16 (stride 32, 960 ch), then P6/P7 from P5
    return BackboneWithFPN(trunk, {"12": "0", "16": "1"}, [112, 960], channels,
                           extra_blocks=LastLevelP6P7(channels, channels))


def _bn_momentum(m: nn.Module, momentum: float = 0.1) -> nn.Module:
    """torchvision's MobileNetV3 uses BatchNorm momentum 0.01, tuned for long ImageNet runs; from scratch and short
    CPU runs the running statistics would lag far behind the weights, so eval-mode outputs would be off."""
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.momentum = momentum
    return m


def build_detector(arch: str = DEFAULT_ARCH, input_size: int = 512, score_thresh: float = 0.05,
                   detections_per_img: int = 8, nms_thresh: float = 0.4) -> nn.Module:
    """Build a randomly initialised detector that resizes its input to ``input_size`` (square)."""
    return _bn_momentum(_build(arch, input_size, score_thresh, detections_per_img, nms_thresh))


def _build(arch: str, input_size: int, score_thresh: float, detections_per_img: int, nms_thresh: float) -> nn.Module:
    common = dict(min_size=input_size, max_size=input_size, image_mean=MEAN, image_std=STD,
                  detections_per_img=detections_per_img)
    if arch == "fcos_mnv3l_fpn64":
        bb = _mnv3_fpn(64)
        anchors = AnchorGenerator(((16,), (32,), (64,), (128,)), ((1.0,),) * 4)
        head = FCOSHead(64, 1, NUM_CLASSES, num_convs=2)
        return FCOS(bb, NUM_CLASSES, anchor_generator=anchors, head=head, score_thresh=score_thresh,
                    nms_thresh=nms_thresh, topk_candidates=200, **common)
    if arch == "retinanet_mnv3l_fpn64":
        bb = _mnv3_fpn(64)
        sizes = tuple((s, int(s * 1.26), int(s * 1.59)) for s in (64, 128, 256, 512))
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 4)
        head = RetinaNetHead(64, anchors.num_anchors_per_location()[0], NUM_CLASSES,
                             norm_layer=partial(nn.GroupNorm, 16))
        return RetinaNet(bb, NUM_CLASSES, anchor_generator=anchors, head=head, score_thresh=score_thresh,
                         nms_thresh=nms_thresh, topk_candidates=200, **common)
    if arch == "fasterrcnn_mobilenet_v3_large_fpn":
        m = get_model(arch, weights=None, weights_backbone=None, num_classes=NUM_CLASSES, box_score_thresh=score_thresh,
                      box_nms_thresh=nms_thresh, min_size=input_size, max_size=input_size, image_mean=MEAN,
                      image_std=STD, box_detections_per_img=detections_per_img)
        _gray_stem(m.backbone.body)
        return m
    raise ValueError(f"unknown detector architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _bench(arch: str, size: int = 512, batch: int = 2, steps: int = 3) -> dict:
    """CPU timing of one architecture: train step img/s and eval img/s (used for the model card)."""
    import time

    torch.manual_seed(0)
    m = build_detector(arch, size)
    imgs = [torch.rand(1, size, size) for _ in range(batch)]
    tg = [{"boxes": torch.tensor([[100.0, 120.0, 220.0, 300.0]]), "labels": torch.tensor([LABEL])}] * batch
    opt = torch.optim.SGD(m.parameters(), lr=1e-4)
    m.train()
    for i in range(steps + 1):
        if i == 1:
            t = time.perf_counter()
        loss = sum(m(imgs, tg).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    tr = batch * steps / (time.perf_counter() - t)
    m.eval()
    with torch.inference_mode():
        m(imgs[:1])
        t = time.perf_counter()
        for _ in range(steps):
            m(imgs[:1])
    ev = steps / (time.perf_counter() - t)
    return {"arch": arch, "params_M": n_params(m) / 1e6, "fp16_MB": n_params(m) * 2 / 1e6,
            "train_img_s": tr, "eval_img_s": ev}


if __name__ == "__main__":
    import json
    import sys

    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    for a in ARCHITECTURES:
        print(json.dumps(_bench(a)), flush=True)
