"""Reproduce a pynetdicom C-STORE stall that involves none of this node's code, and check the node's fix for it.

A pynetdicom SCU sends N C-STOREs on one association to a bare pynetdicom SCP (``AE.start_server``, a handler that
returns 0x0000), while two busy-loop processes keep both cores loaded. It reports every C-STORE that gets no
response within the DIMSE timeout (8 s), and how many responses the SCU's own association reactor loop took off the
DIMSE queue (each such response is lost to ``send_c_store``, which then waits out its DIMSE timeout).

The cause is in pynetdicom's requestor (see ``triage_node/transport/scu.py``): ``send_c_store`` pauses the
association's reactor loop with a flag the loop sets before its checkpoint and clears only after it, so a loop
preempted just past the checkpoint still looks paused, and on its next turn it takes the response and drops it. On
the wire the response left the SCP within 2 ms of the request. ``--guard`` installs the node's fix
(``scu.guard_responses``: the loop takes requests only, responses stay for the caller) on each association.
Figures (with and without ``--guard``) are in ``docs/performance.md``.

    .venv/bin/python bench/scu_stall.py --n 3000            # files as stored
    .venv/bin/python bench/scu_stall.py --n 3000 --decode   # decoded and encoded again
    .venv/bin/python bench/scu_stall.py --n 3000 --guard    # with the node's fix
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
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

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
    ap.add_argument("--guard", action="store_true",
                    help="install the node's fix on each association (triage_node.transport.scu.guard_responses)")
    args = ap.parse_args()
    import pydicom
    from pydicom.uid import generate_uid
    from pynetdicom import AE, _config, association

    from triage_node.services import free_port
    from triage_node.transport.scu import guard_responses

    # a response taken by the association's own reactor loop (the race this bench exposes) is counted here
    stolen = []
    serve = association.Association._serve_request

    def counting_serve(self, msg, context_id):
        if self.is_requestor and getattr(msg, "MessageIDBeingRespondedTo", None) is not None:
            stolen.append(msg.MessageIDBeingRespondedTo)
        return serve(self, msg, context_id)

    association.Association._serve_request = counting_serve

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
                if args.guard and assoc.is_established:
                    guard_responses(assoc)
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
    print(f"{i + 1} C-STOREs ({'decoded' if args.decode else 'files as stored'}"
          f"{', guarded' if args.guard else ''}) in {time.time() - t0:.1f} s, {stalls} without a response, "
          f"{len(stolen)} responses taken by the SCU's own reactor loop")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
