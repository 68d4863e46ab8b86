"""cProfile (CPU-time clock) of the report worker's ``pipeline.build`` over the shared RSNA samples: shares by part.

Run with PYTHONPATH at the checkout to profile (works on checkouts from before the display cache too); OUT is a
scratch folder. Used for docs/performance.md::

    PYTHONPATH=$PWD .venv/bin/python bench/profile_build.py /tmp/profile-out
"""

from __future__ import annotations

import cProfile
import inspect
import logging
import os
import pstats
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("TRIAGE_SHARED_DATA") or ROOT.parent / "shared" / "data") / "cxr_samples" / "rsna_dicom"


def main(out: Path) -> None:
    from triage_node import config, pipeline

    logging.disable(logging.WARNING)
    cfg = config.Config()
    files = sorted(SHARED.glob("*.dcm"))
    model = pipeline.get_model(cfg)
    preds = [pipeline.analyze(f, cfg, model=model) for f in files]
    cached = "display_to" in inspect.signature(pipeline.analyze).parameters

    def prep() -> None:  # what the infer worker leaves behind
        shutil.rmtree(out, ignore_errors=True)
        for i, f in enumerate(files):
            if cached:
                pipeline.analyze(f, cfg, predict=lambda _im, _age, i=i: preds[i],
                                 display_to=out / str(i) / "display.npy")

    def run() -> None:
        for i, (f, p) in enumerate(zip(files, preds)):
            pipeline.build(f, p, cfg, out / str(i))

    prep()
    run()  # warm-up
    prep()
    prof = cProfile.Profile(time.process_time)
    prof.enable()
    run()
    prof.disable()
    cum: dict[str, float] = {}
    for (fn, _line, name), (_cc, _nc, _tt, ct, _callers) in pstats.Stats(prof).stats.items():  # type: ignore[attr-defined]
        if name == "build" and not fn.endswith("pipeline.py"):
            continue
        if name == "save" and fn.endswith("dcmwrite.py"):  # the node's own writer (triage_node/encoding/dcmwrite.py)
            name = "dcmwrite"
        cum[name] = max(cum.get(name, 0.0), ct)
    build = cum["build"]
    parts = {
        "decode source again (pixels)": cum.get("pixels", 0.0),
        "SC JPEG-LS encode": cum.get("encode_buffer", 0.0),
        "SR (build_sr)": cum.get("build_sr", 0.0),
        "SC build excl. encode": cum.get("build_overlay", 0.0) - cum.get("encode_buffer", 0.0),
        "preview": cum.get("write_preview", 0.0),
        "write files (dcmwrite / encoding.dcmwrite)": cum.get("dcmwrite", 0.0),
    }
    parts["other"] = build - sum(parts.values())
    print(f"display cache: {cached}; profiled build CPU {build:.3f} s for {len(files)} (cProfile, CPU-time clock)")
    for k, v in parts.items():
        print(f"  {k:44s} {100 * v / build:5.1f} %   {v:.3f} s")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
