"""`triage-node evaluate`: RSNA metric, mAP@0.5, image-level AUC / sensitivity / specificity, PR curve, ablation.

Box data: ``--labels`` (RSNA or converted CSV) + ``--images``. Image-level data: ``--image-labels`` (``path,label``).
Writes ``report.json`` (and ``pr_curve.png`` for box data) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from triage_node.inference.gate import roc_auc
from triage_node.inference.model import RawOutput, TriageModel, load_model, untrained_model
from triage_node.training import data as D
from triage_node.training.metric import average_precision, rsna_score, sens_spec

log = logging.getLogger(__name__)
CONFIGS = {"detector": (False, False), "detector+gate": (True, False), "detector+prior": (False, True),
           "detector+gate+prior": (True, True)}


def _xywh(pred) -> tuple[np.ndarray, np.ndarray]:
    b = np.array([(d.x, d.y, d.width, d.height) for d in pred.detections], np.float32).reshape(-1, 4)
    return b, np.array([d.score for d in pred.detections], np.float32)


def run_raw(model: TriageModel, paths: list[Path], chunk: int = 8) -> list[RawOutput]:
    """Decode and analyze images in chunks (bounded memory); detector runs on every image (for the ablation)."""
    raws: list[RawOutput] = []
    for i in range(0, len(paths), chunk):
        raws += model.analyze([D.load_image(p) for p in paths[i:i + chunk]], run_detector=True)
    return raws


def box_report(model: TriageModel, gts: list[np.ndarray], raws: list[RawOutput]
               ) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Metrics of the four configurations plus image-level rates at the gate's operating point, and the PR curve
    (precision, recall) of each configuration."""
    y = np.array([len(g) > 0 for g in gts])
    probs = np.array([r.probability for r in raws])
    ablation: dict[str, dict[str, float | int]] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, (use_gate, use_prior) in CONFIGS.items():
        preds = [model.postprocess(r, use_gate, use_prior) for r in raws]
        bs = [_xywh(p) for p in preds]
        ap, _, _ = average_precision(gts, [b for b, _ in bs], [s for _, s in bs])
        sens, spec = sens_spec(y, [len(b) > 0 for b, _ in bs])
        ablation[name] = {"rsna_metric": rsna_score(gts, [b for b, _ in bs], [s for _, s in bs]), "map50": ap,
                          "image_sensitivity_any_box": sens, "image_specificity_any_box": spec,
                          "boxes": int(sum(len(b) for b, _ in bs))}
        saved = model.box_threshold  # PR curve over the full score range
        model.box_threshold = 0.0
        full = [_xywh(model.postprocess(r, use_gate, use_prior)) for r in raws]
        model.box_threshold = saved
        _, prec, rec = average_precision(gts, [b for b, _ in full], [s for _, s in full])
        curves[name] = (prec, rec)
    det_score = np.array([r.scores.max() if len(r.scores) else 0.0 for r in raws])
    sens, spec = sens_spec(y, probs >= model.threshold)
    best = ablation["detector+gate+prior"]
    return {"n_images": len(gts), "n_positive": int(y.sum()), "n_boxes": int(sum(len(g) for g in gts)),
            "rsna_metric": best["rsna_metric"], "map50": best["map50"],
            "image_auc": roc_auc(y, probs), "image_auc_detector_max_score": roc_auc(y, det_score),
            "sensitivity": sens, "specificity": spec, "threshold": model.threshold,
            "box_threshold": model.box_threshold, "prior": model.prior.settings(),
            "ablation": ablation}, curves


def image_report(model: TriageModel, items: list[tuple[Path, int]], raws: list[RawOutput]) -> dict:
    y = np.array([lab for _, lab in items], bool)
    p = np.array([r.probability for r in raws])
    sens, spec = sens_spec(y, p >= model.threshold)
    preds = [model.postprocess(r) for r in raws]
    return {"n_images": len(y), "n_positive": int(y.sum()), "image_auc": roc_auc(y, p),
            "accuracy": float(((p >= model.threshold) == y).mean()), "sensitivity": sens, "specificity": spec,
            "threshold": model.threshold, "images_with_boxes": int(sum(len(x.detections) > 0 for x in preds))}


def plot_pr(curves: dict, path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed: no PR curve written")
        return False
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=110)
    for name, (prec, rec) in curves.items():
        ax.plot(np.concatenate([[0], rec]), np.concatenate([[1], prec]), label=name)
    ax.set(xlabel="recall (IoU 0.5)", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def format_table(report: dict) -> str:
    lines = [f"{'configuration':22s} {'RSNA':>7s} {'mAP@.5':>7s} {'sens':>6s} {'spec':>6s} {'boxes':>6s}"]
    for name, a in report["ablation"].items():
        lines.append(f"{name:22s} {a['rsna_metric']:7.4f} {a['map50']:7.4f} {a['image_sensitivity_any_box']:6.3f} "
                     f"{a['image_specificity_any_box']:6.3f} {a['boxes']:6d}")
    return "\n".join(lines)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a model package on RSNA-format or image-level data",
                                add_help=add_help)
    p.add_argument("--model", required=True, help="model package folder, or 'untrained'")
    p.add_argument("--labels", help="RSNA stage_2_train_labels.csv or converted CSV")
    p.add_argument("--images", help="folder of <patientId>.dcm (RSNA) or image files")
    p.add_argument("--image-labels", help="CSV path,label (image-level evaluation; paths relative to the CSV)")
    p.add_argument("--out", default="eval-report", help="folder for report.json and pr_curve.png")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--box-threshold", type=float, default=None, help="override the package's box score threshold")
    p.add_argument("--prior-min-mean", type=float, default=None, help="override the package's prior cut")
    return p


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = untrained_model(device="cpu" if args.device == "auto" else args.device) if args.model == "untrained" \
        else load_model(args.model, device=args.device)
    if args.box_threshold is not None:
        model.box_threshold = args.box_threshold
    if args.prior_min_mean is not None:
        model.prior.min_mean = args.prior_min_mean
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    base = {"model": {"name": model.info.name, "version": model.info.version, "path": str(args.model),
                      "intended_use": model.info.intended_use}}
    if args.labels:
        if not args.images:
            raise SystemExit("--labels needs --images")
        labels = D.read_labels(args.labels)
        keys = list(labels)[: args.max_images]
        raws = run_raw(model, [D.find_image(args.images, k) for k in keys])
        report, curves = box_report(model, [labels[k] for k in keys], raws)
        report = base | {"data": {"labels": str(args.labels), "images": str(args.images)}} | report
        report["per_image"] = [{"id": k, "probability": r.probability, "gt_boxes": labels[k].tolist(),
                                "pred": [[d.x, d.y, d.width, d.height, d.score] for d in
                                         model.postprocess(r).detections]} for k, r in zip(keys, raws)]
        if plot_pr(curves, out / "pr_curve.png", f"{model.info.name} {model.info.version}"):
            report["pr_curve"] = str(out / "pr_curve.png")
        print(format_table(report))
        print(f"RSNA metric {report['rsna_metric']:.4f}  mAP@0.5 {report['map50']:.4f}  image AUC "
              f"{report['image_auc']:.4f}  sens {report['sensitivity']:.3f}  spec {report['specificity']:.3f} "
              f"(threshold {model.threshold:.3f})")
    elif args.image_labels:
        items = D.read_image_labels(args.image_labels)[: args.max_images]
        raws = run_raw(model, [p for p, _ in items])
        report = base | {"data": {"image_labels": str(args.image_labels)}} | image_report(model, items, raws)
        print(json.dumps({k: v for k, v in report.items() if k != "model"}, indent=1))
    else:
        raise SystemExit("give --labels/--images or --image-labels")
    report["seconds"] = round(time.monotonic() - t0, 2)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(f"wrote {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
