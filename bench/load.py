"""Load test of the whole pipeline: N unique instances over several concurrent associations (DCMTK ``storescu``
processes AND pynetdicom senders) into ``triage-node up`` (private Redis, real Celery workers, a real model), results
to a folder (default) or a local Orthanc.

Reports received, results, lost (must be 0), duplicated outputs (must be 0), latency percentiles (audit ``sent``
lines carry latency_s) and throughput, and writes them to test-artifacts/reliability/load.json.

    .venv/bin/python bench/load.py                      # N = 10,000, model "untrained" (random weights)
    .venv/bin/python bench/load.py --n 300 --senders 2 --storescu 2
    .venv/bin/python bench/load.py --n 300 --dest orthanc
    .venv/bin/python bench/load.py --summary            # the docs/reliability.md table from test-artifacts/reliability

The default model is ``untrained``: the real detector architecture with random weights, labelled UNTRAINED in every
output. Its figures measure the plumbing (throughput, latency, nothing lost), never diagnostic performance.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = sorted((ROOT / "sample_dicom").glob("*.dcm"))
OUT = ROOT / "test-artifacts" / "reliability"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
UNTRAINED_NOTE = "model: UNTRAINED (real architecture, random weights): throughput/reliability figures only"


# -- inputs --------------------------------------------------------------------------------------------------------
def make_instances(n: int, out: Path, shards: int) -> list[Path]:
    """n unique instances (new SOP/Study/Series UIDs on the sample_dicom files), spread over ``shards`` folders."""
    import pydicom
    from pydicom.uid import generate_uid

    srcs = [pydicom.dcmread(p) for p in SAMPLES]
    dirs = [out / f"shard{k:02d}" for k in range(shards)]
    for d in dirs:
        d.mkdir(parents=True)
    for i in range(n):
        ds = srcs[i % len(srcs)]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.save_as(dirs[i % shards] / f"{i:06d}.dcm")
    return dirs


# -- the node ------------------------------------------------------------------------------------------------------
def busy_warning() -> str | None:
    """A warning when the machine is declared shared: ``BENCH_BUSY_LOCK`` names a lock file that other jobs (training,
    test suites) hold while they run; its presence means the timings are under contention."""
    lock = os.environ.get("BENCH_BUSY_LOCK")
    if lock and Path(lock).exists():
        return f"WARNING: {lock} exists: the machine is shared, these timings are not figures"
    return None


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return json.dumps(str(v))


def write_config(path: Path, cfg: dict) -> None:
    lines = [f"{k} = {_toml(v)}" for k, v in cfg.items() if not isinstance(v, (dict, list))]
    for k, v in cfg.items():
        if isinstance(v, dict):
            lines += [f"[{k}]"] + [f"{kk} = {_toml(vv)}" for kk, vv in v.items()]
        elif isinstance(v, list):
            for item in v:
                lines += [f"[[{k}]]"] + [f"{kk} = {_toml(vv)}" for kk, vv in item.items()]
    path.write_text("\n".join(lines) + "\n")


def free_port() -> int:
    from triage_node.services import free_port as fp

    return fp()


def start_node(work: Path, port: int, dest: list[dict], model: str, max_assoc: int,
               visibility_timeout: int = 0) -> tuple[subprocess.Popen, dict]:
    from triage_node.services import wait_port

    cfg = {
        "audit_log": str(work / "audit.jsonl"), "log_level": "WARNING",
        "receiver": {"ae_title": "TRIAGE", "port": port, "allowed_calling_aets": ["STORESCU", "LOADSCU"],
                     "max_associations": max_assoc + 2},
        # the intake guard off: a bench must not stop on how full this machine's disk is
        "spool": {"directory": str(work / "spool"), "max_disk_usage": 1.0, "reserve_mb": 0},
        # `up` starts its private redis-server; a short visibility timeout makes the periodic reconcile sweep run
        # many times while the backlog lasts (it must re-enqueue nothing that is still queued)
        "broker": {"url": "", **({"visibility_timeout": visibility_timeout} if visibility_timeout else {})},
        "model": {"path": model},
        "outputs": {"sr": True, "sc": True, "gsps": False, "archive_dir": ""},
        "retry": {"max_attempts": 5, "backoff_base_s": 0.5, "backoff_max_s": 5.0,
                  "dead_letter_dir": str(work / "dead-letter")},
        "web": {"enabled": False},
        "destinations": dest,
    }
    write_config(work / "node.toml", cfg)
    log = open(work / "node.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "triage_node.cli", "up", "--config", str(work / "node.toml")],
                            cwd=work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    if not wait_port("127.0.0.1", port, 90):
        stop_node(proc)
        raise SystemExit("node did not start:\n" + (work / "node.log").read_text()[-3000:])
    return proc, cfg


def stop_node(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -- senders -------------------------------------------------------------------------------------------------------
def pynetdicom_sender(shard: str, port: int, result_file: str, tries: int = 3) -> None:
    """One association, every file of the shard, as a PACS sends: an instance that got no response (timeout, abort)
    is sent again on a new association, up to ``tries`` times. Statuses per SOP Instance UID and the resends go to
    ``result_file``."""
    import pydicom
    from pynetdicom import AE

    files = sorted(Path(shard).glob("*.dcm"))
    ae = AE(ae_title="LOADSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    ae.add_requested_context(str(first.SOPClassUID), [str(first.file_meta.TransferSyntaxUID)])
    statuses: dict[str, int | None] = {}
    resent: list[dict] = []
    from triage_node.transport.scu import guard_responses  # pynetdicom's requestor race (transport/scu.py)

    assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
    if assoc.is_established:
        guard_responses(assoc)
    for f in files:
        ds = pydicom.dcmread(f)
        sop = str(ds.SOPInstanceUID)
        for attempt in range(tries):
            if not assoc.is_established:
                assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
                if assoc.is_established:
                    guard_responses(assoc)
            rsp = assoc.send_c_store(ds) if assoc.is_established else None
            statuses[sop] = int(rsp.Status) if rsp is not None and "Status" in rsp else None
            if statuses[sop] is not None:
                break
            resent.append({"sop_instance_uid": sop, "attempt": attempt + 1, "at": time.time()})
            if assoc.is_established:
                assoc.abort()
    if assoc.is_established:
        assoc.release()
    Path(result_file).write_text(json.dumps({"statuses": statuses, "resent": resent}))


def storescu_sender(shard: Path, port: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, TCP_NODELAY="1")  # DCMTK otherwise stalls ~45 ms per instance on delayed ACKs
    return subprocess.Popen(["storescu", "-xy", "-aet", "STORESCU", "-aec", "TRIAGE", "-to", "120", "+sd",
                             "127.0.0.1", str(port), str(shard)], stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            env=env)


# -- accounting ----------------------------------------------------------------------------------------------------
def read_audit(path: Path) -> list[dict]:
    from triage_node.audit import read

    return read(path)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))], 3)


def sr_per_study_folder(folder: Path) -> dict[str, int]:
    import pydicom

    per: dict[str, int] = {}
    for f in folder.glob("sr-*.dcm"):
        st = str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)
        per[st] = per.get(st, 0) + 1
    return per


def sr_per_study_orthanc(pacs) -> dict[str, int]:
    import requests

    per: dict[str, int] = {}
    found = requests.post(f"{pacs.url}/tools/find", json={"Level": "Instance", "Expand": True,
                                                          "Query": {"SOPClassUID": SR_CLASS}}, timeout=120).json()
    series_study: dict[str, str] = {}
    for inst in found:
        ser = inst["ParentSeries"]
        if ser not in series_study:
            series_study[ser] = requests.get(f"{pacs.url}/series/{ser}/study", timeout=30).json()[
                "MainDicomTags"]["StudyInstanceUID"]
        st = series_study[ser]
        per[st] = per.get(st, 0) + 1
    return per


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="instances to push (default 10,000)")
    ap.add_argument("--storescu", type=int, default=2, help="concurrent DCMTK storescu associations")
    ap.add_argument("--senders", type=int, default=2, help="concurrent pynetdicom associations")
    ap.add_argument("--dest", choices=["folder", "orthanc"], default="folder")
    ap.add_argument("--model", default="untrained", help="model package, or 'untrained' (default)")
    ap.add_argument("--timeout", type=float, default=0, help="seconds to wait for results (default: 60 + 3 s/instance)")
    ap.add_argument("--visibility-timeout", type=int, default=0,
                    help="broker.visibility_timeout of the node (default: the node's 900 s); also the period of the "
                         "reconcile sweep")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--summary", action="store_true", help="print the reliability table from test-artifacts and exit")
    args = ap.parse_args(argv)
    if args.summary:
        print(summary_table())
        return 0
    if not shutil.which("storescu") and args.storescu:
        raise SystemExit("storescu (DCMTK) not found: make setup")
    shards = args.storescu + args.senders
    work = Path(tempfile.mkdtemp(prefix="triage-load-"))
    print(f"work folder {work}; {UNTRAINED_NOTE if args.model == 'untrained' else 'model: ' + args.model}")
    t_gen = time.time()
    dirs = make_instances(args.n, work / "in", shards)
    print(f"generated {args.n} unique instances in {time.time() - t_gen:.1f} s")
    pacs = None
    if args.dest == "orthanc":
        from triage_node.localpacs import LocalOrthanc

        pacs = LocalOrthanc(work / "orthanc").start()
        dest = [{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": pacs.dicom_port,
                 "ae_title": "ORTHANC", "calling_ae_title": "TRIAGE", "timeout": 30.0}]
    else:
        dest = [{"name": "out", "kind": "folder", "path": str(work / "results")}]
    port = free_port()
    node, cfg = start_node(work, port, dest, args.model, shards, args.visibility_timeout)
    audit_path = Path(cfg["audit_log"])
    rc = 1
    try:
        t0 = time.time()
        procs = [storescu_sender(d, port, work / f"storescu{k}.log") for k, d in enumerate(dirs[:args.storescu])]
        ctx = mp.get_context("spawn")
        senders = [ctx.Process(target=pynetdicom_sender, args=(str(d), port, str(work / f"pnd{k}.json")))
                   for k, d in enumerate(dirs[args.storescu:])]
        for s in senders:
            s.start()
        store_rc = [p.wait() for p in procs]
        for s in senders:
            s.join()
        t_sent = time.time() - t0
        statuses: dict[str, int | None] = {}
        resent: list[dict] = []
        for k in range(args.senders):
            f = work / f"pnd{k}.json"
            got = json.loads(f.read_text()) if f.exists() else {}
            statuses.update(got.get("statuses", {}))
            resent += got.get("resent", [])
        received = {e["sop_instance_uid"] for e in read_audit(audit_path) if e["event"] == "received"}
        print(f"pushed {args.n} in {t_sent:.1f} s ({args.n / t_sent:.1f} inst/s); storescu exit codes {store_rc}; "
              f"pynetdicom non-success {sum(1 for v in statuses.values() if v != 0)}, sent again after no response "
              f"{len(resent)}")
        deadline = time.time() + (args.timeout or 60 + 3 * args.n)
        done: set[str] = set()
        last_report = 0.0
        while time.time() < deadline:
            entries = read_audit(audit_path)
            received = {e["sop_instance_uid"] for e in entries if e["event"] == "received"}
            done = {e["sop_instance_uid"] for e in entries if e["event"] in ("sent", "dead_lettered", "failed",
                                                                              "skipped")}
            if received and received <= done:
                break
            if time.time() - last_report > 30:
                print(f"  {len(done)}/{len(received)} finished after {time.time() - t0:.0f} s", flush=True)
                last_report = time.time()
            time.sleep(2)
        time.sleep(3)  # a late duplicate would land now
        wall = time.time() - t0
        entries = read_audit(audit_path)
        sent = [e for e in entries if e["event"] == "sent"]
        sent_by_sop: dict[str, int] = {}
        for e in sent:
            sent_by_sop[e["sop_instance_uid"]] = sent_by_sop.get(e["sop_instance_uid"], 0) + 1
        dead = {e["sop_instance_uid"] for e in entries if e["event"] in ("dead_lettered", "failed")}
        acked = received  # every `received` audit line is a 0x0000 answer
        lost = sorted(acked - set(sent_by_sop) - dead)
        per_study = sr_per_study_orthanc(pacs) if pacs else sr_per_study_folder(work / "results")
        duplicated = sum(1 for v in per_study.values() if v > 1)
        latencies = [float(e["latency_s"]) for e in sent if "latency_s" in e]
        ts_sent = [e["ts"] for e in sent]
        ts_recv = [e["ts"] for e in entries if e["event"] == "received"]
        span = (max(ts_sent) - min(ts_recv)) if ts_sent and ts_recv else None
        stranded = len(list((work / "spool" / "instances").glob("*.dcm")))
        res = {
            "suite": "load", "n": args.n, "model": args.model, "untrained": args.model == "untrained",
            "dest": args.dest, "storescu_associations": args.storescu, "pynetdicom_associations": args.senders,
            "received": len(acked), "results": len(sent_by_sop), "dead_lettered": len(dead), "lost": len(lost),
            "duplicated_outputs": duplicated, "sent_more_than_once": sum(1 for v in sent_by_sop.values() if v > 1),
            "stranded_in_spool": stranded,
            "reconcile_sweeps": len([e for e in entries if e["event"] == "reconciled"]),
            "reconcile_reenqueued": sum(int(e.get("count", 0)) for e in entries if e["event"] == "reconciled"),
            "reconcile_max_held_by_broker": max([int(e.get("held_by_broker", 0)) for e in entries
                                                 if e["event"] == "reconciled"] or [0]),
            "visibility_timeout_s": args.visibility_timeout or None,
            "refused": sum(1 for e in entries if e["event"] == "refused"),
            # C-STOREs a pynetdicom sender got no response to (dimse timeout / abort) and sent again, as a PACS does
            "sender_resends": len(resent),
            "sender_no_final_status": sum(1 for v in statuses.values() if v is None),
            "received_more_than_once": sum(1 for e in entries if e["event"] == "received") - len(acked),
            "latency_s": {"p50": pct(latencies, 50), "p90": pct(latencies, 90), "p99": pct(latencies, 99),
                          "max": max(latencies) if latencies else None,
                          "mean": round(statistics.fmean(latencies), 3) if latencies else None},
            "ingest_s": round(t_sent, 1), "ingest_per_s": round(args.n / t_sent, 1),
            "throughput_results_per_s": round(len(sent) / span, 2) if span else None,
            "wall_s": round(wall, 1), "cpus": os.cpu_count(),
            "command": f".venv/bin/python bench/load.py --n {args.n} --storescu {args.storescu} "
                       f"--senders {args.senders} --dest {args.dest} --model {args.model}"
                       + (f" --visibility-timeout {args.visibility_timeout}" if args.visibility_timeout else ""),
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "load.json").write_text(json.dumps(res, indent=1))
        print(json.dumps(res, indent=1))
        if args.model == "untrained":
            print(UNTRAINED_NOTE)
        rc = 0 if (not lost and not duplicated and len(acked) == args.n) else 1
        if lost:
            print(f"LOST: {lost[:10]}{' ...' if len(lost) > 10 else ''}")
    finally:
        stop_node(node)
        if pacs:
            pacs.stop()
        if not args.keep and rc == 0:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work folder kept: {work}")
    return rc


# -- the docs table ------------------------------------------------------------------------------------------------
def summary_table(folder: Path = OUT) -> str:
    """Markdown table of the suites' JSON summaries (chaos-*.json, fuzz.json, oddities.json, load.json)."""
    rows = ["| suite | case | injected / run | survived / lost / duplicated | figures | reproduce |",
            "| --- | --- | --- | --- | --- | --- |"]
    for f in sorted(folder.glob("chaos-*.json")):
        r = json.loads(f.read_text())
        extra = ", ".join(f"{k}={r[k]}" for k in ("acked", "delivered", "dead_lettered", "refused_0xA700",
                                                  "stranded_until_restart", "redelivered_first", "retries",
                                                  "seconds") if k in r)
        rows.append(f"| chaos | {r['name']} | {r.get('faults', 1)} fault(s), {r.get('pushed', '?')} instances | "
                    f"{'yes' if r.get('survived') else 'NO'} / {r.get('lost')} / {r.get('duplicated')} | {extra} | "
                    f"`{r['command']}` |")
    f = folder / "fuzz.json"
    if f.exists():
        r = json.loads(f.read_text())
        cases = ", ".join(f"{k}={v}" for k, v in sorted(r["cases"].items()))
        rows.append(f"| fuzz | hostile input | {r['total_cases']} cases ({cases}) | crashes {r['total_crashes']} | "
                    f"{r['seconds']} s, peak RSS {r['peak_rss_mb']} MB | `{r['command']}` |")
    f = folder / "oddities.json"
    if f.exists():
        r = json.loads(f.read_text())
        counts = ", ".join(f"{k}={v}" for k, v in r["counts"].items())
        rows.append(f"| oddities | real-world DICOM oddities through one running node | {r['total']} cases ({counts}) "
                    f"| unexpected outcomes {len(r['unexpected'])} / dciodvfy errors {r['dciodvfy_errors']} | "
                    f"{r['seconds']} s | `{r['command']}` |")
    f = folder / "load.json"
    if f.exists():
        r = json.loads(f.read_text())
        lat = r["latency_s"]
        rows.append(f"| load | {r['n']} instances, {r['storescu_associations']} storescu + "
                    f"{r['pynetdicom_associations']} pynetdicom assoc., dest {r['dest']}, model {r['model']}"
                    f"{' (UNTRAINED)' if r['untrained'] else ''} | received {r['received']}, results {r['results']} | "
                    f"lost {r['lost']} / duplicated {r['duplicated_outputs']} | latency p50 {lat['p50']} s, p90 "
                    f"{lat['p90']} s, p99 {lat['p99']} s; {r['throughput_results_per_s']} results/s; ingest "
                    f"{r['ingest_per_s']} inst/s; wall {r['wall_s']} s on {r['cpus']} CPUs; "
                    f"C-STOREs resent after no response {r.get('sender_resends', 'n/a')}; "
                    f"reconcile sweeps {r.get('reconcile_sweeps', 'n/a')} (re-enqueued "
                    f"{r.get('reconcile_reenqueued', 'n/a')}, up to {r.get('reconcile_max_held_by_broker', 'n/a')} "
                    f"held by the broker); sent twice {r.get('sent_more_than_once', 'n/a')} | `{r['command']}` |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
