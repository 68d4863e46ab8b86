"""Reproduce a pynetdicom C-STORE stall that involves none of this node's code.

A pynetdicom SCU sends N C-STOREs on one association to a bare pynetdicom SCP (``AE.start_server``, a handler that
returns 0x0000), while two busy-loop processes keep both cores loaded. It reports every C-STORE that gets no
response within the DIMSE timeout (8 s). Measured 2026-12-01 on this 2-core machine:

* files streamed as stored (``STORE_SEND_CHUNKED_DATASET``): 1 stall in 3,000;
* files decoded and encoded again: 0 stalls in 6,000 in one run, 2 in 3,166 in another.

Against the node's receiver, pynetdicom's SCU also stalled (1-2 in 3,000, both ways), and DCMTK's storescu did not
(0 in 3,000). So the fault is on pynetdicom's side. The node's own result sender is a pynetdicom SCU: a stalled send
waits for the destination's ``timeout`` (default 30 s), then the report task retries it, so nothing is lost but that
result is late. ``bench/e2e.py`` resends a stalled C-STORE once on a new association and reports how many it resent.

    .venv/bin/python bench/scu_stall.py --n 3000            # files as stored
    .venv/bin/python bench/scu_stall.py --n 3000 --decode   # decoded and encoded again
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _hog(stop) -> None:
    x = 0
    while not stop.is_set():
        x += 1


def _scp(port: int) -> None:
    from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt

    ae = AE(ae_title="BARE")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.network_timeout = 60
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, lambda e: 0x0000)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--decode", action="store_true", help="send decoded datasets, not files as stored")
    ap.add_argument("--hogs", type=int, default=2)
    args = ap.parse_args()
    import pydicom
    from pydicom.uid import generate_uid
    from pynetdicom import AE, _config

    from triage_node.services import free_port

    port = free_port()
    srv = multiprocessing.Process(target=_scp, args=(port,), daemon=True)
    srv.start()
    time.sleep(2)
    work = Path(tempfile.mkdtemp(prefix="scu-stall-"))
    src = sorted((ROOT / "sample_dicom").glob("*.dcm"))
    files = []
    for i in range(200):
        ds = pydicom.dcmread(src[i % len(src)])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        p = work / f"{i:05d}.dcm"
        ds.save_as(p)
        files.append(p)
    _config.STORE_SEND_CHUNKED_DATASET = not args.decode
    ae = AE(ae_title="BENCHSCU")
    ae.acse_timeout = ae.network_timeout = 120
    ae.dimse_timeout = 8
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    ae.add_requested_context(str(first.SOPClassUID), [str(first.file_meta.TransferSyntaxUID)])
    stop = multiprocessing.Event()
    hogs = [multiprocessing.Process(target=_hog, args=(stop,)) for _ in range(args.hogs)]
    for h in hogs:
        h.start()
    assoc, stalls, t0, i = None, 0, time.time(), 0
    try:
        for i in range(args.n):
            if assoc is None or not assoc.is_established:
                assoc = ae.associate("127.0.0.1", port, ae_title="BARE")
            status = assoc.send_c_store(files[i % len(files)])
            if not status:
                stalls += 1
                print(f"C-STORE {i}: no response within {ae.dimse_timeout} s", flush=True)
    finally:
        stop.set()
        for h in hogs:
            h.join()
        if assoc is not None and assoc.is_established:
            assoc.release()
        srv.terminate()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{i + 1} C-STOREs ({'decoded' if args.decode else 'files as stored'}) in {time.time() - t0:.1f} s, "
          f"{stalls} without a response")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
