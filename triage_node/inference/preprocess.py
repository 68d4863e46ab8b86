"""Pixels to network input: any-size 2-D float arrays in [0,1] -> square batches on the target device."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def to_batch(images: Sequence[np.ndarray], size: int, device: torch.device) -> torch.Tensor:
    """Stack images resized (squashed, antialiased) to ``size`` x ``size``: float32 N x 1 x size x size.

    Same-shape images are resized together; on CUDA the host tensor is pinned and copied asynchronously.
    """
    out = torch.empty((len(images), 1, size, size), dtype=torch.float32, device=device)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        if im.ndim != 2:
            raise ValueError(f"expected a 2-D image, got shape {im.shape}")
        groups.setdefault(im.shape, []).append(i)
    for shape, idx in groups.items():
        t = torch.from_numpy(np.stack([np.asarray(images[i], np.float32) for i in idx])[:, None])
        if device.type == "cuda":
            t = t.pin_memory().to(device, non_blocking=True)
        if shape != (size, size):
            t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[idx] = t.clamp_(0, 1)
    return out


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def uint8_to_float(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) / 255.0


def percentile_window(x: torch.Tensor, lo: float = 0.005, hi: float = 0.995, stride: int = 4) -> torch.Tensor:
    """Per-image 0.5-99.5 percentile window of an N x 1 x H x W batch (as dicom_io.pixels does on the CPU),
    on whatever device ``x`` lives; quantiles from a strided subsample for speed."""
    sub = x[..., ::stride, ::stride].reshape(x.shape[0], -1).float()
    q = torch.quantile(sub, torch.tensor([lo, hi], device=x.device), dim=1)  # 2 x N
    a, b = q[0].view(-1, 1, 1, 1), q[1].view(-1, 1, 1, 1)
    return ((x.float() - a) / (b - a).clamp_min(1e-6)).clamp_(0, 1)


def frames_from_dicom(path) -> bytes:
    """The single encapsulated JPEG frame of a JPEG Baseline DICOM (e.g. RSNA), without decoding it."""
    import pydicom
    from pydicom.encaps import generate_frames

    ds = pydicom.dcmread(path)
    if ds.file_meta.TransferSyntaxUID != "1.2.840.10008.1.2.4.50":
        raise ValueError(f"{path}: not JPEG Baseline ({ds.file_meta.TransferSyntaxUID})")
    return next(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))


def decode_jpeg_frames_gpu(frames: Sequence[bytes], device: str | torch.device = "cuda",
                           window: bool = True) -> torch.Tensor:
    """Decode JPEG Baseline frames with nvJPEG (TorchCodec's ``decode_jpeg``: one batched call on CUDA) into an
    N x 1 x H x W float batch in [0,1] on ``device`` (all frames must share one size). ``device="cpu"`` uses
    libjpeg (smoke tests). ``window=True`` applies the same percentile window as dicom_io.pixels.

    TorchCodec, not ``torchvision.io``: torchvision's image codecs are deprecated since 0.29."""
    from torchcodec.decoders import decode_jpeg

    data = [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in frames]
    imgs = decode_jpeg(data, mode="GRAY", device=device)
    assert isinstance(imgs, list)  # a list in, a list out
    x = torch.stack(imgs)  # N x 1 x H x W uint8
    return percentile_window(x) if window else x.float().div_(255)
