"""`triage-node train`: gate on image-level data (Kermany), detector on RSNA-format boxes, lung prior; package.

Detector: early stopping on the validation RSNA metric, resumable checkpoints (``--resume``), tqdm progress.
Operating thresholds (gate: Youden on validation; box score and prior cut: best validation RSNA metric).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from torch import nn

from triage_node.inference.detector import ARCHITECTURES, DEFAULT_ARCH, LABEL, build_detector
from triage_node.inference.gate import GATE_ARCH, GATE_SIZE, build_gate, youden_threshold
from triage_node.inference.model import TriageModel, arch_summary, load_model, save_package
from triage_node.inference.prior import LungPrior
from triage_node.inference.types import ModelInfo
from triage_node.training import data as D
from triage_node.training.gate_train import gate_metrics, gate_probs, jitter, train_gate
from triage_node.training.metric import rsna_score

log = logging.getLogger(__name__)
BOX_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 17))
PRIOR_CUTS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3)


class DetectorTrainState(TypedDict):
    """Early-stopping state of :func:`train_detector`; saved as a plain dict in the resumable checkpoint."""

    epoch: int
    best: float
    best_state: dict[str, torch.Tensor] | None
    bad: int
    history: list[dict[str, Any]]


def _tqdm(it, **kw):
    try:
        from tqdm import tqdm

        return tqdm(it, **kw)
    except ImportError:  # pragma: no cover
        return it


# ------------------------------------------------------------------------------------------------- detector
def detection_batch(samples: list[D.Sample], g: torch.Generator, augment: bool):
    x = torch.stack([torch.from_numpy(s.image) for s in samples])[:, None].float() / 255
    targets = []
    flips = torch.rand(len(samples), generator=g) < 0.5 if augment else torch.zeros(len(samples), dtype=torch.bool)
    for i, s in enumerate(samples):
        b = torch.from_numpy(s.boxes).reshape(-1, 4).clone()
        b[:, 2:] += b[:, :2]
        if flips[i]:
            x[i] = x[i].flip(-1)
            w = s.image.shape[1]
            b[:, [0, 2]] = w - b[:, [2, 0]]
        targets.append({"boxes": b, "labels": torch.full((len(b),), LABEL, dtype=torch.int64)})
    if augment:
        x = jitter(x, g)
    return list(x), targets


@torch.inference_mode()
def detector_outputs(detector: nn.Module, samples: list[D.Sample], batch_size: int = 8) -> list[tuple]:
    """(boxes xywh, scores) per sample, in sample pixels."""
    detector.eval()
    res = []
    for i in range(0, len(samples), batch_size):
        x, _ = detection_batch(samples[i:i + batch_size], torch.Generator(), augment=False)
        for o in detector(x):
            keep = o["labels"] == LABEL
            b = o["boxes"][keep].numpy().reshape(-1, 4).copy()
            b[:, 2:] -= b[:, :2]
            res.append((b, o["scores"][keep].numpy()))
    return res


def best_box_threshold(samples: list[D.Sample], outs: list[tuple]) -> tuple[float, float]:
    """Best RSNA metric over box score thresholds (detector alone): (metric, threshold)."""
    best = (-1.0, 0.5)
    for t in BOX_THRESHOLDS:
        m = rsna_score([s.boxes for s in samples], [b[sc >= t] for b, sc in outs], [sc[sc >= t] for _, sc in outs])
        best = max(best, (m, t))
    return best


def train_detector(detector: nn.Module, train: list[D.Sample], val: list[D.Sample], *, epochs: int = 10,
                   batch_size: int = 4, lr: float = 1e-3, seed: int = 0, ckpt_dir: Path | None = None,
                   resume: bool = False, patience: int = 3, max_minutes: float | None = None,
                   progress: bool = True, positive_fraction: float | None = None) -> dict:
    """Train with AdamW + warmup/cosine; evaluate on ``val`` each epoch; keep the best state (early stopping).

    ``positive_fraction``: resample each epoch (with replacement) so that this share of images has boxes.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    params = [p for p in detector.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = max(epochs * steps_per_epoch, 1)
    warm = min(100, total // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0)))))
    state: DetectorTrainState = {"epoch": 0, "best": -1.0, "best_state": None, "bad": 0, "history": []}
    ckpt = ckpt_dir / "detector_last.pt" if ckpt_dir else None
    if resume and ckpt and ckpt.is_file():
        c = torch.load(ckpt, weights_only=False)
        detector.load_state_dict(c["model"])
        opt.load_state_dict(c["opt"])
        sched.load_state_dict(c["sched"])
        g.set_state(c["rng"])
        state = c["state"]
        log.info("resumed detector from %s at epoch %d", ckpt, state["epoch"])
    t_start = time.monotonic()
    out_of_time = False
    while state["epoch"] < epochs and state["bad"] < patience and not out_of_time:
        detector.train()
        pos = torch.tensor([s.label for s in train], dtype=torch.bool)
        if positive_fraction and 0 < int(pos.sum()) < len(train):
            w = torch.where(pos, positive_fraction / pos.sum(), (1 - positive_fraction) / (~pos).sum())
            order = torch.multinomial(w, len(train), replacement=True, generator=g).tolist()
        else:
            order = torch.randperm(len(train), generator=g).tolist()
        losses = []
        bar = _tqdm(range(steps_per_epoch), desc=f"detector epoch {state['epoch'] + 1}/{epochs}", disable=not progress)
        for s in bar:
            x, tg = detection_batch([train[i] for i in order[s * batch_size:(s + 1) * batch_size]], g, augment=True)
            loss_dict = detector(x, tg)
            loss = sum(loss_dict.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
            if max_minutes and time.monotonic() - t_start > 60 * max_minutes:
                out_of_time = True
                break
        metric, thr = best_box_threshold(val, detector_outputs(detector, val)) if val else (float("nan"), 0.5)
        state["epoch"] += 1
        state["history"].append({"epoch": state["epoch"], "loss": float(np.mean(losses)), "first_loss": losses[0],
                                 "last_loss": float(np.mean(losses[-10:])), "val_rsna": metric, "val_box_thr": thr,
                                 "steps": len(losses), "minutes": (time.monotonic() - t_start) / 60})
        log.info("detector epoch %d loss %.4f val RSNA %.4f (box thr %.2f)", state["epoch"], np.mean(losses), metric,
                 thr)
        if progress:
            print(json.dumps(state["history"][-1]), flush=True)
        if metric > state["best"]:
            state["best"], state["bad"] = metric, 0
            state["best_state"] = {k: v.detach().clone() for k, v in detector.state_dict().items()}
        else:
            state["bad"] += 1
        if ckpt:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"model": detector.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "rng": g.get_state(), "state": state}, tmp)
            tmp.replace(ckpt)
    if state["best_state"] is not None:
        detector.load_state_dict(state["best_state"])
    return {"best_val_rsna": state["best"], "epochs": state["epoch"], "history": state["history"],
            "stopped": "time" if out_of_time else ("early" if state["bad"] >= patience else "epochs")}


# ------------------------------------------------------------------------------------------------- thresholds
def choose_operating_point(model: TriageModel, val: list[D.Sample]) -> dict:
    """Box score threshold and prior cut that maximise the validation RSNA metric of the full pipeline."""
    raws = model.analyze([s.image.astype(np.float32) / 255 for s in val], run_detector=True)
    best = (-1.0, model.box_threshold, model.prior.min_mean)
    for cut in PRIOR_CUTS:
        model.prior.min_mean = cut
        for t in BOX_THRESHOLDS:
            model.box_threshold = t
            preds = [model.postprocess(r) for r in raws]
            m = rsna_score([s.boxes for s in val], [[(d.x, d.y, d.width, d.height) for d in p.detections]
                                                     for p in preds], [[d.score for d in p.detections] for p in preds])
            best = max(best, (m, t, cut))
    model.box_threshold, model.prior.min_mean = best[1], best[2]
    return {"val_rsna_full_pipeline": best[0], "box_score": best[1], "prior_min_mean": best[2]}


# ------------------------------------------------------------------------------------------------- CLI
def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train the triage model (gate + detector) and write a model package",
                                add_help=add_help)
    p.add_argument("--labels", help="RSNA stage_2_train_labels.csv or converted CSV (image_name,xmin,...)")
    p.add_argument("--images", help="folder of <patientId>.dcm (or the converted CSV's image files)")
    p.add_argument("--synthetic", type=int, default=0, help="instead of --labels: N in-memory synthetic images")
    p.add_argument("--val-frac", type=float, default=0.2, help="patient-level validation fraction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", default=DEFAULT_ARCH, choices=ARCHITECTURES)
    p.add_argument("--input-size", type=int, default=512)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--positive-fraction", type=float, default=None,
                   help="oversample images with boxes to this share of each epoch (e.g. 0.5)")
    p.add_argument("--patience", type=int, default=3, help="early stopping: epochs without val improvement")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-time budget for the detector")
    p.add_argument("--gate-data", help="Kermany-style folder with labels.csv (path,split,label,id_prefix)")
    p.add_argument("--gate-limit", type=int, default=None, help="use at most N gate images (tests)")
    p.add_argument("--gate-epochs", type=int, default=6)
    p.add_argument("--gate-with-detection-data", action="store_true",
                   help="also train/validate the gate on the detector's images (image label = has boxes)")
    p.add_argument("--gate-from", help="reuse the gate (and its threshold) of an existing model package")
    p.add_argument("--out", required=True, help="model package folder to write")
    p.add_argument("--checkpoint-dir", help="resumable checkpoints (default: <out>/../<name>.ckpt)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--name", default="cxr-triage-demo")
    p.add_argument("--version", default="0.1.0-demo")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--no-progress", action="store_true")
    return p


def _detection_data(args) -> tuple[list[D.Sample], list[D.Sample], str]:
    if args.synthetic:
        all_s = D.synthetic_samples(args.synthetic, args.input_size, args.seed)
        keys = [s.key for s in all_s]
        tr_k, va_k = D.patient_split(keys, args.val_frac, args.seed)
        by = {s.key: s for s in all_s}
        return [by[k] for k in tr_k], [by[k] for k in va_k], f"{args.synthetic} in-memory synthetic images"
    if not (args.labels and args.images):
        raise SystemExit("give --labels and --images, or --synthetic N")
    labels = D.read_labels(args.labels)
    tr_k, va_k = D.patient_split(list(labels), args.val_frac, args.seed)
    t0 = time.monotonic()
    tr = D.load_detection_samples(labels, tr_k, args.images, args.input_size)
    va = D.load_detection_samples(labels, va_k, args.images, args.input_size)
    log.info("decoded %d images in %.1f s", len(tr) + len(va), time.monotonic() - t0)
    return tr, va, f"{len(labels)} images from {args.labels}"


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.monotonic()
    progress = not args.no_progress
    out = Path(args.out)
    ckpt_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else out.parent / f".{out.name}.ckpt"
    tr, va, det_desc = _detection_data(args)
    n_pos = sum(s.label for s in tr)
    log.info("detector data: %d train (%d positive), %d val", len(tr), n_pos, len(va))
    metrics: dict = {"detector_data": {"train": len(tr), "val": len(va), "train_positive": n_pos}}

    # gate
    gate = build_gate(GATE_ARCH)
    gate_desc = "none (untrained)"
    threshold = 0.5
    if args.gate_from:
        src = load_model(args.gate_from, device="cpu")
        gate.load_state_dict(src.gate.state_dict())
        threshold = src.threshold
        metrics["gate"] = src.meta.get("metrics", {}).get("gate", {})
        gate_desc = src.meta.get("training_data", {}).get("gate", f"gate of {args.gate_from}")
    elif args.gate_data or args.gate_with_detection_data:
        gtr, gva = (D.read_kermany(args.gate_data, GATE_SIZE, seed=args.seed, limit=args.gate_limit)
                    if args.gate_data else ([], []))
        parts = [f"Kermany pediatric CXR ({len(gtr)} train / {len(gva)} val, held out by id_prefix)"] if gtr else []
        gtr_all, gva_all = list(gtr), list(gva)
        if args.gate_with_detection_data:
            gtr_all += tr
            gva_all += va
            parts.append(f"detector images ({det_desc}; label = has boxes)")
        gate_desc = " + ".join(parts)
        gh = train_gate(gate, gtr_all, gva_all, epochs=args.gate_epochs, seed=args.seed, progress=progress)
        p_all = gate_probs(gate, gva_all)
        threshold = youden_threshold([s.label for s in gva_all], p_all) if gva_all else 0.5
        metrics["gate"] = {"threshold_rule": "Youden J on the gate validation set", "history": gh["history"],
                           "val_all": gate_metrics(np.array([s.label for s in gva_all]), p_all, threshold)}
        if gva:
            metrics["gate"]["val_kermany"] = gate_metrics(np.array([s.label for s in gva]), p_all[:len(gva)],
                                                          threshold)
        if args.gate_with_detection_data and va:
            metrics["gate"]["val_detection_data"] = gate_metrics(np.array([s.label for s in va]),
                                                                 p_all[len(gva):], threshold)
    log.info("gate threshold %.3f (%.1f min so far)", threshold, (time.monotonic() - t0) / 60)

    # detector
    detector = build_detector(args.arch, args.input_size)
    dh = train_detector(detector, tr, va, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        seed=args.seed, ckpt_dir=ckpt_dir, resume=args.resume, patience=args.patience,
                        max_minutes=args.max_minutes, progress=progress,
                        positive_fraction=args.positive_fraction)
    metrics["detector"] = dh
    from pydicom.uid import generate_uid

    info = ModelInfo(name=args.name, version=args.version, architecture=arch_summary(args.arch, GATE_ARCH,
                                                                                   args.input_size), demo=True,
                     device_uid=generate_uid(entropy_srcs=["triage-node model", args.name, args.version]))
    model = TriageModel(detector, gate, LungPrior.from_box_stats(), info, threshold=threshold,
                        input_size=args.input_size, detector_arch=args.arch, device=args.device)
    metrics["operating_point"] = choose_operating_point(model, va) if va else {}
    minutes = (time.monotonic() - t0) / 60
    extra = {
        "training_data": {"gate": gate_desc, "detector": det_desc,
                          "prior": "coverage heatmap of the 9,555 boxes of RSNA stage_2_train_labels.csv"},
        "training": {"device": args.device, "threads": torch.get_num_threads(), "minutes": round(minutes, 1),
                     "seed": args.seed, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                     "input_size": args.input_size},
        "metrics": metrics,
    }
    save_package(model, out, extra=extra, card=None if (out / "MODEL_CARD.md").exists() else _card(extra, info))
    print(json.dumps({"out": str(out), "minutes": round(minutes, 1), "gate_threshold": threshold,
                      "best_val_rsna": dh["best_val_rsna"], **metrics["operating_point"]}, indent=2))
    return 0


def _card(extra: dict, info: ModelInfo) -> str:
    return (f"# {info.name} {info.version}\n\n**Demo model, not for clinical use.**\n\n"
            f"Architecture: {info.architecture}\n\nTraining data: {json.dumps(extra['training_data'], indent=1)}\n\n"
            f"Training: {json.dumps(extra['training'])}\n\nSee model.json for metrics.\n")


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
