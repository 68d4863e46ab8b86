"""CPU ms per CXR by stage, for bench/e2e.py: run with PYTHONPATH set to the checkout being measured.

Each stage is timed with ``time.process_time`` (all threads of this process: pynetdicom's send runs in its own
threads) around the functions the workers call, one instance at a time, after one warm-up instance. Prints one JSON
line: the mean per stage. Works on checkouts from before the result-building changes too (then ``build`` decodes
the source again and the preview decodes the SC).

Without ``--port`` it starts a private Orthanc for the send stage (``triage_node.localpacs``), so it runs on its own::

    PYTHONPATH=<checkout> .venv/bin/python bench/e2e_stages.py --model models/demo --out /tmp/stages --repeat 3 \
        ../shared/data/cxr_samples/rsna_dicom/*.dcm
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, default=0,
                    help="Orthanc DICOM port (the send stage); default: start a private Orthanc")
    ap.add_argument("--repeat", type=int, default=1, help="go over the files this many times (default 1)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("files", nargs="+", type=Path)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    if args.port:
        run(args)
        return
    from triage_node.localpacs import LocalOrthanc

    pacs = LocalOrthanc(args.out / "orthanc").start()
    try:
        args.port = pacs.dicom_port
        run(args)
    finally:
        pacs.stop()


def run(args: argparse.Namespace) -> None:

    import pydicom

    from triage_node import config, dicom_io, pipeline
    from triage_node.encoding.pr import build_gsps
    from triage_node.encoding.sanitize import clean_source
    from triage_node.encoding.sc import build_overlay, render_overlay
    from triage_node.encoding.sr import build_sr
    from triage_node.transport.senders import CStoreSender

    try:  # the input statistics of the drift monitor (newer code; monitoring.input_statistics)
        from triage_node.inference import filmstats
    except ImportError:
        filmstats = None
    try:  # the writer pipeline.build uses (newer code)
        from triage_node.encoding.dcmwrite import save
    except ImportError:
        save = None

    cfg = config.Config()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=args.model),
                              outputs=dataclasses.replace(cfg.outputs, archive_dir=str(args.out / "archive")))
    dest = config.Destination(name="pacs", kind="dicom", host="127.0.0.1", port=args.port, ae_title="ORTHANC",
                              calling_ae_title="TRIAGE", timeout=30.0)
    model = pipeline.get_model(cfg)
    caches = "display_to" in inspect.signature(pipeline.analyze).parameters
    totals: dict[str, float] = {}

    def timed(name: str, fn, *a, **kw):
        c0 = time.process_time()
        out = fn(*a, **kw)
        totals[name] = totals.get(name, 0.0) + time.process_time() - c0
        return out

    phased = "only" in inspect.signature(pipeline.build).parameters
    cap = getattr(cfg.outputs, "sc_max_size", 0)  # older code: the display at the source's size

    def render(im):
        if "max_size" in inspect.signature(dicom_io.display).parameters:
            return dicom_io.display(im, cap)
        return dicom_io.display(im)

    for i, f in enumerate([args.files[0]] + list(args.files) * args.repeat):
        if i == 1:
            totals.clear()  # the first instance was the warm-up
        # the node's own path: infer worker (decode + model), report worker (build, send)
        box = args.out / f"box{i}"
        ds = timed("decode", dicom_io.read, f)
        img = timed("decode", dicom_io.pixels, ds)
        pred = timed("model", lambda im: model.predict([im])[0], img)
        if filmstats is not None:  # what the infer worker adds per film for the drift monitor
            timed("input_statistics", lambda im=img, d=ds: filmstats.image_statistics(im)
                  | filmstats.header_statistics(d))
        if caches:  # what the infer worker adds: the 8-bit rendering left for the report worker
            timed("display_cache_write", lambda b=box, im=img: pipeline.save_display(b / pipeline.DISPLAY_CACHE,
                                                                                       dicom_io.display(im)))
        files = timed("build_total", pipeline.build, f, pred, cfg, box)
        if phased:  # the report worker's SR-first phases: build the SR alone, then the rest from the display cache
            pbox = args.out / f"phased{i}"
            pipeline.save_display(pbox / pipeline.DISPLAY_CACHE, dicom_io.display(img))
            timed("build_sr_phase", pipeline.build, f, pred, cfg, pbox, only=("sr",))
            timed("build_images_phase", pipeline.build, f, pred, cfg, pbox, only=("sc", "gsps"))
        timed("send", CStoreSender(dest).send, files)
        # the parts of build, on their own
        header = pydicom.dcmread(f, stop_before_pixels=True)
        display = render(img)
        cleaned, _ = timed("clean_source", clean_source, header)
        timed("sr", build_sr, cleaned, pred)
        enc = cfg.outputs.sc_transfer_syntax  # the configured overlay encoding (older code: no palette option)
        palette = ({"palette": enc == "jpeg-ls-palette"}
                   if "palette" in inspect.signature(render_overlay).parameters else {})
        overlay = timed("overlay_render", render_overlay, display, pred, **palette)
        sc = timed("overlay_render_encode", build_overlay, cleaned, display, pred, encoding=enc)
        timed("gsps_not_configured", build_gsps, cleaned, pred)
        sr = build_sr(cleaned, pred)
        if save is None:  # older code: pydicom's writer, as its pipeline.build used
            timed("write_sr", sr.save_as, args.out / f"sr{i}.dcm", enforce_file_format=True)
            timed("write_sc", sc.save_as, args.out / f"sc{i}.dcm", enforce_file_format=True)
        else:
            timed("write_sr", save, sr, args.out / f"sr{i}.dcm")
            timed("write_sc", save, sc, args.out / f"sc{i}.dcm")
        try:
            timed("preview", pipeline.write_preview, overlay, args.out / f"p{i}.png")
        except AttributeError:  # older code: the preview is made from the SC dataset (decoding it)
            timed("preview", pipeline.write_preview, sc, args.out / f"p{i}.png")
    n = len(args.files) * args.repeat
    totals["write"] = totals.get("write_sr", 0.0) + totals.get("write_sc", 0.0)
    res = {k: round(v * 1000 / n, 1) for k, v in totals.items()}
    res["overlay_encode"] = round(res.pop("overlay_render_encode") - res["overlay_render"], 1)
    res["n"] = n
    res["display_cache"] = caches
    print(json.dumps(res))


if __name__ == "__main__":
    main()
