"""CPU inference benchmark on the real RSNA sample DICOMs (1024x1024), side by side in one run:

* ``previous``: the package shipped before (0.1.0-demo: 128 px gate + FCOS MobileNetV3 detector at 512 px),
  extracted from git (``--baseline-model``, default commit 7bb7020), through ``TriageModel.predict``;
* ``ours`` / ``ours_all``: the current package (``--model``), with the gate skipping localisation on negatives /
  localising every image;
* ``baseline``: plain torchvision eager inference of the current package's network (detector, or the classifier
  for a class-activation-map package), batch 1, no pre/post-processing.

Each variant runs in its own subprocess so that its peak RSS is its own. Usage:
    .venv/bin/python bench/cpu_infer.py [--model models/demo] [--n 20] [--threads 2] [--batch 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RSNA = ROOT.parent / "shared" / "data" / "cxr_samples" / "rsna_dicom"
REPEATS = 3


def _images(n: int):
    from triage_node.training.data import load_image

    files = sorted(RSNA.glob("*.dcm"))
    if files:
        imgs = [load_image(p) for p in files]
    else:  # no ../shared: synthetic RSNA-like images
        from triage_node.training.synth import generate

        imgs = [c.image.astype("float32") / 255 for c in generate(10, 1024, seed=0)]
    return [imgs[i % len(imgs)] for i in range(n)]


def run_variant(variant: str, model_dir: str, n: int, threads: int, batch: int) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from triage_node.inference.model import load_model, untrained_model

    model = load_model(model_dir, device="cpu") if model_dir != "untrained" else untrained_model()
    imgs = _images(n)
    if variant in ("ours", "ours_all"):
        # "ours": the real path (the detector is skipped where the gate says negative);
        # "ours_all": detector on every image (worst case, same work as the baseline plus gate and prior)
        gate = variant == "ours"
        model.batch_size = batch
        model.predict(imgs[:3], use_gate=gate)  # warm-up
        dts = []
        for _ in range(REPEATS):  # best of REPEATS passes: the machine is shared, the minimum is the least noisy
            t = time.perf_counter()
            preds = model.predict(imgs, use_gate=gate)
            dts.append(time.perf_counter() - t)
        dt = min(dts)
        t1 = time.perf_counter()
        model.predict(imgs[:1], use_gate=False)  # one 1024x1024 CXR, detector always run
        lat = time.perf_counter() - t1
        extra = {"boxes": sum(len(p.detections) for p in preds), "batch": batch,
                 "detector_runs": sum((p.probability >= model.threshold) or not gate for p in preds)}
    else:  # plain torchvision eager, batch 1, fp32: the detector (its transform resizes) or the classifier
        if model.detector is not None:
            det = model.detector.eval()
            tens = [torch.from_numpy(np.ascontiguousarray(im))[None] for im in imgs]
        else:
            clf = model.gate.eval()

            def det(xs):
                return clf(torch.nn.functional.interpolate(xs[0][None], size=(model.gate_size,) * 2,
                                                           mode="bilinear", antialias=True))

            tens = [torch.from_numpy(np.ascontiguousarray(im))[None] for im in imgs]
        dts = []
        with torch.no_grad():
            for x in tens[:3]:
                det([x])  # warm-up
            for _ in range(REPEATS):
                t = time.perf_counter()
                for x in tens:
                    det([x])
                dts.append(time.perf_counter() - t)
        dt = min(dts)
        lat = dt / n
        extra = {"batch": 1, "note": "network only (no gate/prior/postprocess), torch.no_grad, fp32"}
    return {"variant": variant, "cxr_per_s": n / dt, "latency_1_image_s": lat,
            "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "threads": threads,
            "n": n, **extra}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "models" / "demo"))
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--baseline-model", default="git:7bb7020",
                   help="the previous package: a folder, or git:COMMIT to extract models/demo from history")
    p.add_argument("--variant", choices=["ours", "ours_all", "baseline", "previous"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.variant:
        model = a.model
        if a.variant == "previous":
            model, a.variant = a.baseline_model, "ours"
        print(json.dumps(run_variant(a.variant, model, a.n, a.threads, a.batch)))
        return 0
    if a.baseline_model.startswith("git:"):
        a.baseline_model = _from_git(a.baseline_model[4:])
    rows = []
    for v in ("previous", "baseline", "ours_all", "ours"):
        out = subprocess.run([sys.executable, __file__, "--variant", v, "--model", a.model, "--n", str(a.n),
                              "--threads", str(a.threads), "--batch", str(a.batch), "--baseline-model",
                              a.baseline_model], capture_output=True, text=True, check=True, cwd=ROOT)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]) | {"variant": v})
    print(f"{'variant':52s} {'CXR/s':>7s} {'1-img s':>8s} {'peak RSS MB':>12s}  ratio to previous")
    names = {"previous": f"previous package predict ({Path(a.baseline_model).name}), gate skips",
             "baseline": "torchvision eager network, batch 1",
             "ours_all": f"TriageModel.predict, batch {a.batch}, localise all",
             "ours": f"TriageModel.predict, batch {a.batch} (gate skips)"}
    for r in rows:
        print(f"{names[r['variant']]:52s} {r['cxr_per_s']:7.2f} {r['latency_1_image_s']:8.3f} "
              f"{r['peak_rss_MB']:12.0f}  {r['cxr_per_s'] / rows[0]['cxr_per_s']:.2f}x")
    print(json.dumps(rows))
    return 0


def _from_git(commit: str) -> str:
    """models/demo as it was at ``commit``, extracted under var/bench/ (once)."""
    out = ROOT / "var" / "bench" / f"models-{commit}"
    if not (out / "models" / "demo" / "model.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        arch = subprocess.run(["git", "archive", commit, "models/demo"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(out)], input=arch.stdout, check=True)
    return str(out / "models" / "demo")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
