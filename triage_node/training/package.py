"""Write a classifier + class-activation-map model package (the shipped demo model's format)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from triage_node.inference.classifier import CamClassifier
from triage_node.inference.model import CAM, TriageModel, _sha256, save_package
from triage_node.inference.prior import DensityAtlas, LungPrior
from triage_node.inference.types import ModelInfo

PRIOR_MIN_MEAN = 0.3  # as the earlier package: a box whose mean RSNA-box coverage is below this is dropped


def cam_summary(arch: str, size: int, tta: bool) -> str:
    return (f"{arch} classifier ({size}px{', flip TTA' if tta else ''}) with class-activation-map boxes "
            f"+ RSNA box-coverage lung prior")


def _training_record(args: argparse.Namespace, summary: dict) -> dict:
    soup = list(getattr(args, "soup", None) or [])
    if soup:  # no training in this step: say what the weights are, not the unused schedule's defaults
        return {"device": "cpu", "minutes": summary["minutes"], "input_size": args.size,
                "soup": [{"checkpoint": Path(p).name, "sha256": _sha256(Path(p))} for p in soup],
                "note": f"no training in this step: the uniform average of {len(soup)} run(s)' best weights "
                        "(one run = those weights repackaged); see the model card for how they were trained"}
    return {"device": "cpu", "threads": torch.get_num_threads(), "minutes": summary["minutes"],
            "seed": args.seed, "train_seed": getattr(args, "train_seed", None), "epochs": args.epochs,
            "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
            "augmentation": args.aug, "input_size": args.size, "ema_decay": getattr(args, "ema", 0.0),
            "loss_balance": getattr(args, "balance", "none"),
            "init": getattr(args, "init_note", None) or args.init or "random (weights=None)",
            "freeze_blocks": getattr(args, "freeze_blocks", 0), "nuisance_augmentation": getattr(args, "nuisance", 0.0),
            "stop_epoch": getattr(args, "stop_epoch", 0) or None}


def _no_nan(obj: object) -> object:
    """NaN (a run without a validation split has no validation AUC) as null: model.json stays valid JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_no_nan(v) for v in obj]
    return obj


def fit_atlas(paths: list[Path], size: int, prior: LungPrior, source: str = "") -> DensityAtlas:
    """The side prior's atlas from films without a finding, decoded and resized exactly as inference does."""
    from triage_node.inference.preprocess import to_batch
    from triage_node.training.data import load_image

    films = torch.cat([to_batch([load_image(p)], size, torch.device("cpu"))[:, 0] for p in paths])
    return DensityAtlas.fit(films, prior.heat, source=source)


def write_cam_package(model: CamClassifier, args: argparse.Namespace, summary: dict, manifest: dict,
                      out: Path, atlas_films: list[Path] | None = None) -> Path:
    """Package ``model`` with the operating point chosen on validation data; the card is written separately.
    ``atlas_films``: films without a finding (the primary source's training split) for the density side prior."""
    from pydicom.uid import generate_uid

    info = ModelInfo(name=args.name, version=args.version, architecture=cam_summary(args.arch, args.size, args.tta),
                     demo=True, intended_use="demo model, not for clinical use",
                     device_uid=generate_uid(entropy_srcs=["triage-node model", args.name, args.version]))
    t = float(summary["operating_point"]["threshold"])
    prior = LungPrior.from_box_stats(min_mean=PRIOR_MIN_MEAN)
    atlas = None
    if atlas_films:
        atlas = fit_atlas(atlas_films, args.size, prior,
                          source=f"{len(atlas_films)} training films without a finding of the primary source")
    tm = TriageModel(None, model, prior, info, threshold=t, box_threshold=0.0, input_size=args.size,
                     gate_size=args.size, detector_arch=CAM, gate_arch=args.arch, device="cpu", tta=args.tta,
                     atlas=atlas, harmonise=getattr(args, "harmonise", "none"))
    extra = {
        "training_data": {
            "sources": {src: {"weight": m["weight"], "train": len(m["train"]), "val": len(m["val"]),
                              "test": len(m["test"]), "positives": m["positives"]} for src, m in manifest.items()},
            "split": f"by patient/group column, val {args.val_frac}, test {args.test_frac}, seed {args.seed}"
                     + ("; every patient with an NIH box held out in test" if args.holdout_boxed else "")
                     + (f"; cross-validation {args.cv} of the primary source's train + val pool"
                        if getattr(args, "cv", None) else ""),
            "prior": "coverage heatmap of the 9,555 boxes of RSNA stage_2_train_labels.csv",
            "localisation": "no box supervision: boxes are read from the class-activation map"
                            + ("; the hemithorax denser than a normal film (density atlas of the training "
                               "negatives) holds them" if atlas is not None else ""),
        },
        "training": _training_record(args, summary),
        "shortcut_probe": _no_nan(summary.get("shortcut_probe") or {}),
        "metrics": _no_nan({k: summary[k] for k in ("best_epoch", "best_val_auc", "val_auc_shipped",
                                                     "operating_point", "other_val_sources", "stopped")
                            if k in summary} | {"val_auc_by_view": summary.get("val_auc_by_view", {})}
                           | {"history": [{k: v for k, v in h.items() if k != "val_p"} for h in summary["history"]]}),
    }
    d = save_package(tm, out, extra=extra)
    # which films trained, validated and tested it (keys only), so anyone can evaluate on its held-out split
    (d / "split.json").write_text(json.dumps(manifest) + "\n")
    return d
