"""Training the image-level gate: class-balanced BCE, light augmentation, best epoch by validation AUC."""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from torch import nn

from triage_node.inference.gate import GATE_SIZE, roc_auc
from triage_node.training import data as D


def _tqdm(it, **kw):
    try:
        from tqdm import tqdm

        return tqdm(it, **kw)
    except ImportError:  # pragma: no cover
        return it


def jitter(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random contrast/brightness/gamma on a [0,1] batch (N,1,H,W)."""
    n = x.shape[0]
    c = 1 + (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 0.3
    b = (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 0.1
    gm = 1 + (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 0.4
    return (((x - 0.5) * c + 0.5 + b).clamp(0, 1) ** gm).clamp(0, 1)


def _gate_batch(samples: list[D.Sample], size: int, g: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack([torch.from_numpy(D.to_uint8(s.image / 255.0, size) if s.image.shape[0] != size else s.image.copy())
                     for s in samples])[:, None].float() / 255
    y = torch.tensor([float(s.label) for s in samples])
    if g is not None:
        flip = torch.rand(len(samples), generator=g) < 0.5
        x[flip] = x[flip].flip(-1)
        pad = size // 16
        xp = nn.functional.pad(x, (pad,) * 4, mode="replicate")
        dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=g).tolist()
        x = jitter(xp[..., dy:dy + size, dx:dx + size], g)
    return x, y


@torch.inference_mode()
def gate_probs(gate: nn.Module, samples: list[D.Sample], size: int = GATE_SIZE, batch_size: int = 64) -> np.ndarray:
    gate.eval()
    return np.concatenate([torch.sigmoid(gate(_gate_batch(samples[i:i + batch_size], size, None)[0])).numpy()
                           for i in range(0, len(samples), batch_size)]) if samples else np.zeros(0)


def gate_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    y = np.asarray(y).astype(bool)
    return {"n": int(len(y)), "auc": roc_auc(y, p), "accuracy@0.5": float(((p >= 0.5) == y).mean()),
            "accuracy@threshold": float(((p >= threshold) == y).mean()),
            "sensitivity@threshold": float((p[y] >= threshold).mean()) if y.any() else float("nan"),
            "specificity@threshold": float((p[~y] < threshold).mean()) if (~y).any() else float("nan")}


def train_gate(gate: nn.Module, train: list[D.Sample], val: list[D.Sample], *, epochs: int = 6,
               batch_size: int = 32, lr: float = 2e-3, size: int = GATE_SIZE, seed: int = 0,
               progress: bool = True) -> dict:
    """Class-balanced BCE, AdamW + one-cycle; best epoch by validation AUC."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    y = np.array([s.label for s in train])
    pos_weight = torch.tensor((len(y) - y.sum()) / max(y.sum(), 1), dtype=torch.float32)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    opt = torch.optim.AdamW(gate.parameters(), lr=lr, weight_decay=1e-4)
    steps = math.ceil(len(train) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(epochs * steps, 1))
    best, best_state, hist = -1.0, None, []
    for ep in range(epochs):
        gate.train()
        order = torch.randperm(len(train), generator=g).tolist()
        losses = []
        for s in _tqdm(range(steps), desc=f"gate epoch {ep + 1}/{epochs}", disable=not progress):
            x, t = _gate_batch([train[i] for i in order[s * batch_size:(s + 1) * batch_size]], size, g)
            loss = loss_fn(gate(x), t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        p = gate_probs(gate, val, size)
        auc = roc_auc([s.label for s in val], p) if val else float("nan")
        hist.append({"epoch": ep + 1, "loss": float(np.mean(losses)), "val_auc": auc})
        if progress:
            print(json.dumps(hist[-1]), flush=True)
        if not auc <= best:  # also true for nan (no val): keep last
            best, best_state = auc, {k: v.detach().clone() for k, v in gate.state_dict().items()}
    if best_state is not None:
        gate.load_state_dict(best_state)
    return {"history": hist, "best_val_auc": best}
