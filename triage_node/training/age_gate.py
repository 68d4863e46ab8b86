"""Combine two model packages into one that routes films by the patient's age.

    triage-node age-gate --model var/cv-plain/pkg --pediatric-from models/demo --max-age 6 \\
        --version 0.4.0-demo --out var/age-gate/pkg

The adult package keeps everything (gate, threshold, lung prior, side prior); the pediatric package lends its gate
and its own operating threshold. Films whose Patient's Age is below ``--max-age`` years go through that gate only
(``TriageModel`` batches each population through its own network); a film without a readable age is treated as an
adult. Why: on this project's data a gate trained without children ranks children's films at chance, and mixing
them into its training costs adult AUC (model card). Both networks are stored as int8 weights with per-channel
scales by default (``--weights``), so two ResNet-18s fit the package budget of one in fp16.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

KEEP = ("training_data", "training", "metrics", "demo", "intended_use", "manufacturer", "device_uid",
        "shortcut_probe")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Package an adult model with a pediatric gate routed by Patient's Age",
                                add_help=add_help)
    p.add_argument("--model", required=True, help="the adult package (everything but the pediatric gate)")
    p.add_argument("--pediatric-from", required=True, help="the package whose gate and threshold serve children")
    p.add_argument("--max-age", type=float, default=6.0,
                   help="the pediatric gate judges patients younger than this many years (default 6: Kermany's "
                        "films are of children aged 1 to 5)")
    p.add_argument("--weights", choices=("int8", "fp16"), default="int8")
    p.add_argument("--version", required=True)
    p.add_argument("--out", required=True)
    return p


def main(args: argparse.Namespace) -> int:
    from triage_node.inference.classifier import CamClassifier
    from triage_node.inference.model import AgeOperatingPoint, TriageModel, load_model, save_package
    from triage_node.inference.types import ModelInfo

    adult = load_model(args.model, device="cpu")
    child = load_model(args.pediatric_from, device="cpu")
    if adult.detector is not None or not isinstance(child.gate, CamClassifier):
        raise SystemExit("age-gate combines CAM-localiser packages (architecture.detector = 'cam') only")
    if adult.gate_size != child.gate_size:
        raise SystemExit(f"the two gates take different input sizes ({adult.gate_size} vs {child.gate_size} px)")
    if (adult.harmonise, adult.blur_sigma) != (child.harmonise, child.blur_sigma):
        raise SystemExit(f"the two gates were trained on differently harmonised inputs ({adult.harmonise} vs "
                         f"{child.harmonise}): one package has one preprocessing")
    if args.max_age <= 0:
        raise SystemExit("--max-age must be > 0")
    src = Path(args.pediatric_from)
    point = AgeOperatingPoint(
        "pediatric", child.threshold, args.max_age,
        rule=f"the gate and operating threshold of {child.info.name} {child.info.version} (chosen on its own "
             f"validation split), for patients younger than {args.max_age:g} years",
        calibration={"gate_from": f"{child.info.name} {child.info.version}",
                     "gate_sha256": child.meta["files"]["gate.safetensors"]["sha256"],  # checked by load_model
                     "metrics": (child.meta.get("metrics") or {}).get("other_val_sources", {})},
        gate=child.gate, gate_arch=child.gate_arch)
    info = ModelInfo(name=adult.info.name, version=args.version,
                     architecture=f"{adult.info.architecture}; children under {args.max_age:g} y: "
                                  f"{child.gate_arch} gate of {child.info.version}",
                     manufacturer=adult.info.manufacturer, demo=adult.info.demo or child.info.demo,
                     intended_use=adult.info.intended_use, device_uid=adult.info.device_uid)
    torch.manual_seed(0)
    model = TriageModel(None, adult.gate, adult.prior, info, threshold=adult.threshold,
                        box_threshold=adult.box_threshold, input_size=adult.input_size, gate_size=adult.gate_size,
                        detector_arch=adult.detector_arch, gate_arch=adult.gate_arch, device="cpu", tta=adult.tta,
                        cam_threshold=adult.cam_threshold, max_boxes=adult.max_boxes, atlas=adult.atlas,
                        pediatric=point, harmonise=adult.harmonise, blur_sigma=adult.blur_sigma)
    extra = {k: adult.meta[k] for k in KEEP if k in adult.meta}
    extra["age_gate"] = {"adult_from": f"{adult.info.name} {adult.info.version}",
                         "pediatric_from": f"{child.info.name} {child.info.version}",
                         "pediatric_training_data": child.meta.get("training_data", {})}
    out = save_package(model, args.out, extra=extra, weights=args.weights)
    # which films trained / validated / tested each gate: the adult package's sources, plus the pediatric package's
    # sources the adult one does not have (e.g. its Kermany groups)
    splits = [json.loads(f.read_text()) for f in (src / "split.json", Path(args.model) / "split.json") if f.exists()]
    if splits:
        merged: dict = {}
        for sp in splits:
            merged |= sp
        (out / "split.json").write_text(json.dumps(merged, indent=1) + "\n")
    load_model(out, device="cpu")
    size = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    print(f"wrote {out}: adult gate {adult.info.version} (threshold {adult.threshold:.4f}), pediatric gate "
          f"{child.info.version} (threshold {child.threshold:.4f}) under {args.max_age:g} y, {args.weights} weights, "
          f"{size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
