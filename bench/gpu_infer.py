"""GPU worker throughput: nvjpeg decode + percentile window + resize + gate + detector + postprocess (bf16
autocast, channels_last, batched) vs plain torchvision eager inference of the same detector (fp32) at batch 1
and 64, with the GPU memory peak of each. Input: the JPEG Baseline frames of RSNA-format DICOMs (the real samples
in ../shared, else synthetic ones written on the fly).

    python bench/gpu_infer.py [--model models/demo] [--n 640] [--batches 1 64]    # on an H100
    python bench/gpu_infer.py --smoke                                              # tiny CPU run (tests)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RSNA = ROOT.parent / "shared" / "data" / "cxr_samples" / "rsna_dicom"


def _frames(n: int) -> list[bytes]:
    from triage_node.inference.preprocess import frames_from_dicom

    files = sorted(RSNA.glob("*.dcm"))
    if not files:
        from triage_node.training import synth

        tmp = Path(tempfile.mkdtemp())
        synth.write_dataset(tmp, 4, seed=0)
        files = sorted((tmp / "images").glob("*.dcm"))
    fr = [frames_from_dicom(p) for p in files]
    return [fr[i % len(fr)] for i in range(n)]


def _timed(fn, device, repeats: int = 1):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / repeats
    mem = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return out, dt, mem


def bench(model_dir: str, n: int, batches: list[int], device_name: str, smoke: bool) -> list[dict]:
    import torch

    from triage_node.inference.model import load_model, untrained_model
    from triage_node.inference.preprocess import decode_jpeg_frames_gpu, resize_batch

    device = torch.device(device_name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = (untrained_model(device=device_name, input_size=256) if model_dir == "untrained"
             else load_model(model_dir, device=device_name))
    frames = _frames(n)
    rows = []
    for bs in batches:
        model.batch_size = bs

        def ours(bs=bs):
            preds = []
            for i in range(0, n, bs):
                x = decode_jpeg_frames_gpu(frames[i:i + bs], device=device)  # N x 1 x 1024 x 1024 in [0,1]
                shapes = [tuple(x.shape[-2:])] * len(x)
                x = resize_batch(x, model.input_size)
                if device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                raws = model.analyze_tensor(x, shapes)
                preds += [model.postprocess(r) for r in raws]
            return preds

        ours()  # warm-up (cudnn autotune, nvjpeg handles)
        preds, dt, mem = _timed(ours, device)
        rows.append({"variant": "ours end-to-end (decode+pre+gate+detector+post)", "batch": bs,
                     "cxr_per_s": n / dt, "gpu_peak_MB": mem, "boxes": sum(len(p.detections) for p in preds)})

        # baseline: plain torchvision eager, fp32, same network and weights, inputs already decoded on device: the
        # detector (its transform resizes) or, for a class-activation-map package (no detector), the classifier
        # on the same batch resized to its input size
        net = model.detector if model.detector is not None else model.gate
        net = net.to(memory_format=torch.contiguous_format).eval()
        x_all = decode_jpeg_frames_gpu(frames[: min(n, bs)], device=device)

        def baseline(bs=bs, net=net, x_all=x_all, size=model.gate_size):
            with torch.no_grad():
                for i in range(0, n, bs):
                    x = x_all[: min(bs, n - i)]
                    if model.detector is not None:
                        net(list(x))
                    else:
                        net(torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True))

        baseline()
        _, dt, mem = _timed(baseline, device)
        what = "detector" if model.detector is not None else "classifier"
        rows.append({"variant": f"torchvision eager fp32 ({what} only, pre-decoded)", "batch": bs,
                     "cxr_per_s": n / dt, "gpu_peak_MB": mem})
        if device.type == "cuda":
            net.to(memory_format=torch.channels_last)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="GPU end-to-end inference benchmark")
    p.add_argument("--model", default=str(ROOT / "models" / "demo"))
    p.add_argument("--n", type=int, default=640)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (no GPU needed): n=4, batches 1 and 2")
    a = p.parse_args(argv)
    import torch

    if a.smoke:
        device, a.n, a.batches = "cpu", 4, [1, 2]
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU smoke mode", file=sys.stderr)
        return 2
    else:
        device = "cuda"
    rows = bench(a.model, a.n, a.batches, device, a.smoke)
    if device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for r in rows:
        print(f"{r['variant']:55s} batch {r['batch']:3d}  {r['cxr_per_s']:9.1f} CXR/s  "
              f"GPU peak {r['gpu_peak_MB']:8.0f} MB")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
