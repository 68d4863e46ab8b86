"""End-to-end throughput, latency and CPU per CXR of the real node, beside the bare decode + model loop.

A private Orthanc is the PACS; ``triage-node up`` (private Redis, Celery workers, the model) sends its results there
by C-STORE; this script C-STOREs unique copies of the RSNA samples to the node over one association, and reports:

* bare loop: ``pipeline.analyze`` over the same files in this process (decode + model, one CXR at a time);
* sustained: a burst of ``--n`` instances, first C-STORE -> last result stored in Orthanc (counted by its
  /statistics), results/s and the ratio to the bare loop;
* paced: ``--paced`` instances at ``--rate`` per second (below capacity), C-STORE start -> the SR seen in Orthanc's
  /changes (polled every 10 ms), percentiles;
* backfill (``--backfill N``): N further instances stored in Orthanc (StudyDate 19990101) are re-analysed through
  ``triage-node backfill`` (QIDO-RS + WADO-RS from Orthanc, no request-rate limit) by the same running node; from
  the backfill's start to the last result in Orthanc, results/s and the ratio to the sustained C-STORE figure;
* CPU ms per CXR: by node process (receiver, infer worker, report worker, Redis; from /proc over the burst) and by
  stage (decode, model, SR, overlay, GSPS, write, preview, build total, send; ``time.process_time`` around the same
  functions, one instance at a time, in a separate process running the same code); peak RSS per node process.

``--baseline DIR`` runs the whole node measurement a second time on another checkout of the code (e.g. main, from
``git archive``) in the same run, and prints both with ratios. Figures are only worth something on a quiet machine.

    .venv/bin/python bench/e2e.py --n 200 --rate 1 --paced 30
    .venv/bin/python bench/e2e.py --n 200 --baseline /tmp/main-copy      # before / after in one run
    .venv/bin/python bench/e2e.py --n 200 --backfill 200                  # + the archive backfill, same node
    .venv/bin/python bench/e2e.py --n 3 --paced 2 --bare 3               # smoke test (tests/test_bench_e2e.py)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

# bench/load.py, importable only after the sys.path insert above
from load import busy_warning, free_port, pct, stop_node, write_config  # noqa: E402

SHARED = Path(os.environ.get("TRIAGE_SHARED_DATA") or ROOT.parent / "shared" / "data") / "cxr_samples" / "rsna_dicom"
OUT = ROOT / "test-artifacts" / "performance"
STAGE_SCRIPT = Path(__file__).resolve().parent / "e2e_stages.py"


T_START = time.time()


def phase(text: str) -> None:
    print(f"[{time.time() - T_START:6.1f} s] {text}", file=sys.stderr, flush=True)


def sources() -> list[Path]:
    files = sorted(SHARED.glob("*.dcm")) or sorted((ROOT / "sample_dicom").glob("*.dcm"))
    if not files:
        raise SystemExit(f"no RSNA samples in {SHARED} or sample_dicom/")
    return files


BACKFILL_DATE = "19990101"  # the backfill instances' StudyDate: nothing else in the bench's Orthanc has it


def mix(flagged: list[Path], negative: list[Path], share: float, slots: int = 20) -> list[Path]:
    """A cycle of ``slots`` source films of which round(share * slots) are ones the model flags, spread evenly,
    each kind taken in turn from its list: the workload of a stream with that share of films over the threshold."""
    k = round(share * slots)
    if (k and not flagged) or (k < slots and not negative):
        raise SystemExit(f"--flagged-share {share}: the samples hold {len(flagged)} flagged and {len(negative)} "
                         "negative films under this model")
    out: list[Path] = []
    for i in range(slots):  # slot i is flagged when the running count of flagged slots steps up (even spacing)
        taken = i * k // slots  # flagged slots before slot i
        is_flagged = (i + 1) * k // slots > taken
        out.append(flagged[taken % len(flagged)] if is_flagged else negative[(i - taken) % len(negative)])
    return out


def model_config(model: str, site_point: str | None = None):
    """The node's defaults with this model package (what the bench's in-process loops analyse with); with
    ``site_point``, that site operating point file (``--set model.site_operating_point=...``) as the node has it."""
    import dataclasses

    from triage_node import config

    cfg = config.Config()
    extra = {} if site_point is None else {"site_operating_point": site_point}
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=model, **extra))


def flagged_sources(model: str, settings: list[str] | None = None) -> tuple[list[Path], list[Path]]:
    """The samples split by the model's verdict at its operating point (as the node will judge them, a site
    operating point given in ``settings`` included)."""
    from triage_node import pipeline

    site = next((s.split("=", 1)[1] for s in settings or () if s.startswith("model.site_operating_point=")), None)
    cfg = model_config(model, site)
    m = pipeline.get_model(cfg)
    verdicts = {f: pipeline.analyze(f, cfg, model=m).positive for f in sources()}
    return [f for f, v in verdicts.items() if v], [f for f, v in verdicts.items() if not v]


def make_instances(n: int, out: Path, prefix: str, study_date: str = "", cycle: list[Path] | None = None) -> list[Path]:
    """n unique instances (new Study/Series/SOP UIDs) from the RSNA samples, or cycling through ``cycle``."""
    import pydicom
    from pydicom.uid import generate_uid

    srcs = [pydicom.dcmread(p) for p in (cycle or sources())]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        ds = srcs[i % len(srcs)]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        if study_date:
            ds.StudyDate = study_date
        paths.append(out / f"{prefix}{i:05d}.dcm")
        ds.save_as(paths[-1])
    return paths


# -- /proc accounting ------------------------------------------------------------------------------------------------
def _role(cmdline: str) -> str:
    if "redis-server" in cmdline:
        return "redis"
    if "-Q infer" in cmdline:
        return "infer_worker"
    if "-Q report" in cmdline:
        return "report_worker"
    if "triage_node.cli" in cmdline:
        return "receiver"
    return "other"


def node_processes(pgid: int) -> dict[int, str]:
    """pid -> role of every live process in the node's process group."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) != pgid:  # field 5: pgrp
                continue
            found[int(d.name)] = _role((d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, ValueError):
            continue
    return found


def cpu_s(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


def cpu_by_role(procs: dict[int, str], extra: dict[str, int]) -> dict[str, float]:
    out: dict[str, float] = {}
    for pid, role in procs.items():
        out[role] = out.get(role, 0.0) + cpu_s(pid)
    for role, pid in extra.items():
        out[role] = cpu_s(pid)
    return out


# -- Orthanc watching ------------------------------------------------------------------------------------------------
class SrWatcher(threading.Thread):
    """Polls Orthanc's /changes every ``interval`` s and notes when each SOP Instance UID of interest is stored."""

    def __init__(self, pacs, wanted: dict[str, str], interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        import requests

        self.pacs, self.wanted, self.interval = pacs, wanted, interval  # wanted: SR SOP UID -> source SOP UID
        self.session = requests.Session()
        self.seen: dict[str, float] = {}  # source SOP UID -> time the SR was seen
        self.stop = threading.Event()
        self.since = int(self.session.get(f"{pacs.url}/changes?last", timeout=10).json().get("Last", 0))

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                got = self.session.get(f"{self.pacs.url}/changes?since={self.since}&limit=200", timeout=10).json()
            except Exception:  # a missed poll is retried
                time.sleep(self.interval)
                continue
            now = time.time()
            for ch in got.get("Changes", []):
                if ch.get("ChangeType") != "NewInstance":
                    continue
                tags = self.session.get(f"{self.pacs.url}/instances/{ch['ID']}", timeout=10).json()
                src = self.wanted.get(tags.get("MainDicomTags", {}).get("SOPInstanceUID", ""))
                if src and src not in self.seen:
                    self.seen[src] = now
            self.since = got.get("Last", self.since)
            if not got.get("Done", True):
                continue
            time.sleep(self.interval)


def count_instances(pacs) -> int:
    import requests

    return int(requests.get(f"{pacs.url}/statistics", timeout=10).json()["CountInstances"])


# -- sending ---------------------------------------------------------------------------------------------------------
class Scu:
    """The PACS side: C-STOREs the files as stored, on one association (a new one when the node closed it)."""

    def __init__(self, port: int) -> None:
        import pydicom
        from pynetdicom import AE, _config

        _config.STORE_SEND_CHUNKED_DATASET = True  # files go as stored: the bench's own CPU stays small
        first = pydicom.dcmread(sources()[0], stop_before_pixels=True)
        self.port = port
        self.ae = AE(ae_title="BENCHSCU")
        self.ae.acse_timeout = self.ae.network_timeout = 120
        self.ae.dimse_timeout = 10  # a loopback C-STORE takes ms; a stalled one (see store) costs 10 s, not 120
        self.ae.add_requested_context(str(first.SOPClassUID), [str(first.file_meta.TransferSyntaxUID)])
        self.assoc = None

    def connect(self) -> None:
        if self.assoc is None or not self.assoc.is_established:  # the node closes an association idle > 60 s
            self.assoc = self.ae.associate("127.0.0.1", self.port, ae_title="TRIAGE")
            if not self.assoc.is_established:
                raise SystemExit("the node refused the association")
            from triage_node.transport.scu import guard_responses

            guard_responses(self.assoc)  # pynetdicom's requestor race (transport/scu.py): stalls should be 0 now

    stalls = 0  # C-STOREs answered by nothing (see bench/scu_stall.py): resent once on a new association

    def store(self, path: Path) -> None:
        self.connect()
        status = self.assoc.send_c_store(path)
        if not status:  # no response at all (unguarded pynetdicom SCUs stalled ~1 in 3000 under load): kept as a check
            Scu.stalls += 1
            print(f"C-STORE of {path.name}: no response (stall {Scu.stalls}); resent on a new association",
                  file=sys.stderr, flush=True)
            if self.assoc.is_established:
                self.assoc.abort()
            self.connect()
            status = self.assoc.send_c_store(path)
        if not status or int(status.Status) != 0:
            raise SystemExit(f"C-STORE of {path.name} failed: {status}")

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()


def sop_uid(path: Path) -> str:
    from pydicom.filereader import read_file_meta_info

    return str(read_file_meta_info(path).MediaStorageSOPInstanceUID)


# -- one node run ----------------------------------------------------------------------------------------------------
def apply_settings(cfg: dict, settings: list[str]) -> dict:
    """``SECTION.KEY=VALUE`` overrides (VALUE read as JSON, else as a string), e.g. outputs.report_processes=2."""
    for item in settings:
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise SystemExit(f"--set {item!r}: expected SECTION.KEY=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        cfg.setdefault(section, {})[name] = value
    return cfg


def results_per_instance(cfg: dict) -> int | None:
    """Objects the node stores in the PACS per instance under this run's [outputs] (the burst is done when the PACS
    holds that many per instance); None when it depends on the film (``sc_for = "flagged"``: no overlay below the
    threshold), and the node's own ``sent`` records say when each instance is done."""
    out = cfg["outputs"]
    if out.get("sc") and out.get("sc_for", "all") == "flagged":
        return None
    return sum(bool(out.get(kind)) for kind in ("sr", "sc", "gsps"))


def wait_done(pacs, cfg: dict, per_instance: int | None, base: int, sops: set[str], deadline: float,
              n: int | None = None) -> bool:
    """Wait until every instance's results are in the PACS: by the PACS's instance count when each instance makes
    ``per_instance`` objects, else by the node's audit records (``sent`` is written once the PACS acknowledged every
    result of the instance; a dead letter or a failure ends an instance too). True when all were done in time.
    ``n``: by the count, wait for that many instances' results (default: all of ``sops``)."""
    from triage_node.audit import read as read_audit

    def done() -> bool:
        if per_instance is not None:
            return count_instances(pacs) >= base + per_instance * (len(sops) if n is None else n)
        ended = {e.get("sop_instance_uid") for e in read_audit(Path(cfg["audit_log"]), since=time.time() - 3600)
                 if e.get("event") in ("sent", "dead_lettered", "failed")}
        return sops <= ended

    while not done():
        if time.time() >= deadline:
            return False
        time.sleep(0.1 if per_instance is not None else 0.25)
    return True


def start_node(work: Path, code: Path, model: str, pacs,
               settings: list[str] | None = None) -> tuple[subprocess.Popen, dict, int]:
    from triage_node.services import wait_port

    port = free_port()
    cfg = {
        "audit_log": str(work / "audit.jsonl"), "log_level": "WARNING",
        "receiver": {"ae_title": "TRIAGE", "port": port, "allowed_calling_aets": ["BENCHSCU"], "max_associations": 4},
        # the intake guard off: a bench must not stop on how full this machine's disk is
        "spool": {"directory": str(work / "spool"), "max_disk_usage": 1.0, "reserve_mb": 0},
        "broker": {"url": ""},
        "model": {"path": model},
        "outputs": {"sr": True, "sc": True, "gsps": False, "archive_dir": str(work / "results")},
        "retry": {"max_attempts": 5, "backoff_base_s": 0.5, "backoff_max_s": 5.0,
                  "dead_letter_dir": str(work / "dead-letter")},
        "web": {"enabled": False},
        "destinations": [{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": pacs.dicom_port,
                          "ae_title": "ORTHANC", "calling_ae_title": "TRIAGE", "timeout": 30.0}],
    }
    write_config(work / "node.toml", apply_settings(cfg, settings or []))
    env = dict(os.environ, PYTHONPATH=str(code))
    with open(work / "node.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "triage_node.cli", "up", "--config", str(work / "node.toml")],
                                cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    if not wait_port("127.0.0.1", port, 120):
        stop_node(proc)
        raise SystemExit("node did not start:\n" + (work / "node.log").read_text()[-3000:])
    return proc, cfg, port


def run_node(args, code: Path, label: str, version: str, work: Path, settings: list[str] | None = None) -> dict:
    from triage_node.audit import read as read_audit
    from triage_node.encoding.uids import derive_uid
    from triage_node.localpacs import LocalOrthanc

    work.mkdir(parents=True)
    warm = make_instances(1, work / "in", "warm")
    burst = make_instances(args.n, work / "in", "burst", cycle=args.cycle)
    paced = make_instances(args.paced, work / "in", "paced", cycle=args.cycle)
    pacs = LocalOrthanc(work / "orthanc").start()
    node, cfg, port = start_node(work, code, args.model, pacs, settings)
    phase(f"{label}: node up on {code}")
    try:
        every = warm + burst + paced
        wanted = {derive_uid(sop_uid(p), version, "sr"): sop_uid(p) for p in every}
        watcher = SrWatcher(pacs, wanted)
        watcher.start()
        scu = Scu(port)
        for p in warm:  # workers load torch and the model on their first task: not part of the figures
            scu.store(p)
        deadline = time.time() + 900  # minutes when the machine is busy
        while not all(sop_uid(p) in watcher.seen for p in warm) and time.time() < deadline:
            time.sleep(0.05)
        if time.time() >= deadline:
            raise SystemExit("warm-up results never reached Orthanc:\n" + (work / "node.log").read_text()[-3000:])
        phase(f"{label}: warm-up result in Orthanc; burst of {args.n}")
        time.sleep(1.0)
        outputs_per_result = results_per_instance(cfg)  # SR + SC by default; --set outputs.sc=false etc.
        base = count_instances(pacs)
        pgid = node.pid
        procs = node_processes(pgid)
        extra = {"orthanc": pacs.proc.pid}
        cpu0 = cpu_by_role(procs, extra)
        scu.connect()
        t0 = time.time()
        for p in burst:
            scu.store(p)
        t_sent = time.time() - t0
        burst_sops = {sop_uid(p) for p in burst}
        complete = wait_done(pacs, cfg, outputs_per_result, base, burst_sops,
                             time.time() + 120 + 10 * args.n)
        t_done = time.time() - t0
        cpu1 = cpu_by_role(procs, extra)
        phase(f"{label}: burst done in {t_done:.1f} s; {args.paced} paced at {args.rate}/s")
        # paced: one C-STORE every 1/rate s on the same association, latency to the SR in Orthanc
        start: dict[str, float] = {}
        scu.connect()
        nxt = time.time()
        for p in paced:
            time.sleep(max(0.0, nxt - time.time()))
            start[sop_uid(p)] = time.time()
            scu.store(p)
            nxt += 1.0 / args.rate
        deadline = time.time() + 120 + 10 * args.paced
        while not all(u in watcher.seen for u in start) and time.time() < deadline:
            time.sleep(0.05)
        watcher.stop.set()
        scu.close()
        latencies = [watcher.seen[u] - t for u, t in start.items() if u in watcher.seen]
        rss: dict[str, float] = {}
        for pid, role in node_processes(pgid).items():
            rss[role] = max(rss.get(role, 0.0), peak_rss_mb(pid))
        backfill = (run_backfill(args, code, work, pacs, procs, extra, cfg, outputs_per_result) if args.backfill
                    else None)
        entries = read_audit(Path(cfg["audit_log"]))
    finally:
        stop_node(node)
        pacs.stop()
    cpu_ms = {role: round((cpu1[role] - cpu0.get(role, 0.0)) * 1000 / args.n, 1) for role in cpu1}
    node_total = sum(v for k, v in cpu_ms.items() if k != "orthanc")
    return {
        "code": str(code), "label": label,
        "sustained": {"n": args.n, "complete": complete, "ingest_s": round(t_sent, 2), "wall_s": round(t_done, 2),
                      "results_per_s": round(args.n / t_done, 2)},
        "paced": {"n": len(start), "rate_per_s": args.rate, "results": len(latencies),
                  "latency_s": {q: pct(latencies, int(q[1:])) for q in ("p50", "p90", "p95", "p99")}
                  | {"max": round(max(latencies), 3) if latencies else None}},
        "cpu_ms_per_cxr_by_process": cpu_ms | {"node_total": round(node_total, 1)},
        "peak_rss_mb": rss | {"node_total": round(sum(rss.values()), 1)},
        "dead_lettered_or_failed": sum(1 for e in entries if e.get("event") in ("dead_lettered", "failed")),
        # share of the burst over the operating threshold (what outputs.sc_for = "flagged" builds overlays for)
        "burst_flagged_share": round(sum(1 for e in entries if e.get("event") == "analysed" and e.get("positive")
                                         and e.get("sop_instance_uid") in burst_sops) / args.n, 3),
    } | ({"backfill": backfill} if backfill else {})


def run_backfill(args, code: Path, work: Path, pacs, procs: dict[int, str], extra: dict[str, int], cfg: dict,
                 per_instance: int | None) -> dict:
    """``--backfill`` N instances, stored in Orthanc first, re-analysed by the running node through
    ``triage-node backfill``: clock from the backfill's start to the last of their results (SR + SC) in Orthanc."""
    import resource

    import requests

    files = make_instances(args.backfill, work / "in", "backfill", study_date=BACKFILL_DATE, cycle=args.cycle)
    with requests.Session() as http:
        for f in files:  # into the archive before the clock starts
            http.post(f"{pacs.url}/instances", data=f.read_bytes(), timeout=30).raise_for_status()
    phase(f"backfill of {args.backfill} from Orthanc (DICOMweb) through the running node")
    base = count_instances(pacs)
    cpu0 = cpu_by_role(procs, extra)
    child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    env = dict(os.environ, PYTHONPATH=str(code))
    res = subprocess.run([sys.executable, "-m", "triage_node.cli", "backfill", "--config", str(work / "node.toml"),
                          "--url", pacs.dicomweb_url, "--from", BACKFILL_DATE, "--to", BACKFILL_DATE,
                          "--concurrency", "4", "--rate", "0", "--no-progress"],
                         cwd=code, env=env, capture_output=True, text=True, timeout=600, check=False)
    t_fed = time.time() - t0
    child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    got = re.search(r"received (\d+)", res.stdout)
    received = int(got[1]) if got else 0  # what the backfill handed to the node (a backfill that misses studies
    deadline = time.time() + 120 + 10 * max(received, 1)  # is reported as incomplete, not waited for)
    # by the audit, which ones were handed over is not known: a backfill that missed some is incomplete
    done = (per_instance is not None or received == len(files)) and wait_done(
        pacs, cfg, per_instance, base, {sop_uid(f) for f in files}, deadline, n=received)
    t_done = time.time() - t0
    cpu1 = cpu_by_role(procs, extra)
    n = max(received, 1)
    node_ms = sum(cpu1[r] - cpu0.get(r, 0.0) for r in cpu1 if r != "orthanc") * 1000 / n
    backfill_ms = ((child1.ru_utime + child1.ru_stime) - (child0.ru_utime + child0.ru_stime)) * 1000 / n
    return {"n": args.backfill, "received": received, "exit": res.returncode,
            "complete": received == args.backfill and done,
            "fed_s": round(t_fed, 2), "wall_s": round(t_done, 2), "results_per_s": round(received / t_done, 2),
            "summary": res.stdout.strip().splitlines()[-3:],
            "cpu_ms_per_cxr": {"backfill_process": round(backfill_ms, 1), "node": round(node_ms, 1),
                               "orthanc": round((cpu1["orthanc"] - cpu0["orthanc"]) * 1000 / n, 1)}}


def stage_profile(code: Path, model: str, files: list[Path], work: Path) -> dict:
    """CPU ms per stage on ``code``, in a separate process (the same functions the workers call)."""
    from triage_node.localpacs import LocalOrthanc

    pacs = LocalOrthanc(work / "orthanc-stages").start()
    try:
        env = dict(os.environ, PYTHONPATH=str(code))
        res = subprocess.run([sys.executable, str(STAGE_SCRIPT), "--model", model, "--port", str(pacs.dicom_port),
                              "--out", str(work / "stages")] + [str(f) for f in files],
                             cwd=code, env=env, capture_output=True, text=True, timeout=1200, check=False)
    finally:
        pacs.stop()
    if res.returncode != 0:
        raise SystemExit("stage profile failed:\n" + res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def bare_loop(model: str, files: list[Path]) -> dict:
    """decode + model, one CXR at a time, in this process (the baseline the node is compared with)."""
    import logging

    from triage_node import dicom_io, pipeline

    logging.disable(logging.WARNING)
    cfg = model_config(model)
    m = pipeline.get_model(cfg)
    for f in files[:2]:
        pipeline.analyze(f, cfg, model=m)
    t0, c0 = time.time(), time.process_time()
    preds = [pipeline.analyze(f, cfg, model=m) for f in files]
    wall, cpu = time.time() - t0, time.process_time() - c0
    c0 = time.process_time()
    for f in files:  # the decode part on its own
        dicom_io.pixels(dicom_io.read(f))
    decode = time.process_time() - c0
    logging.disable(logging.NOTSET)
    return {"n": len(files), "cxr_per_s": round(len(files) / wall, 2),
            "cpu_ms_per_cxr": round(cpu * 1000 / len(files), 1),
            "decode_cpu_ms_per_cxr": round(decode * 1000 / len(files), 1),
            "model": preds[0].model.label, "version": preds[0].model.version}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="burst size (default 200)")
    ap.add_argument("--rate", type=float, default=1.0, help="paced C-STOREs per second (default 1)")
    ap.add_argument("--paced", type=int, default=30, help="paced instances (default 30)")
    ap.add_argument("--bare", type=int, default=50, help="instances in the bare decode + model loop (default 50)")
    ap.add_argument("--stages", type=int, default=10, help="instances in the per-stage CPU profile (default 10)")
    ap.add_argument("--model", default=str(ROOT / "models" / "demo"), help="model package, or 'untrained'")
    ap.add_argument("--baseline", type=Path, help="another checkout of the code to measure the same way")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a node setting for the current code's run (repeatable), e.g. outputs.report_processes=2; "
                         "with --baseline pointing at a copy of the same code, an A/B of the setting in one run")
    ap.add_argument("--baseline-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a node setting for the baseline's run (repeatable)")
    ap.add_argument("--backfill", type=int, default=0,
                    help="also re-analyse this many instances from Orthanc through `triage-node backfill` (0 = skip)")
    ap.add_argument("--flagged-share", type=float, metavar="F",
                    help="feed a mix of the samples of which this share is flagged by the model (e.g. 0.4), instead of "
                         "the samples in turn: for settings whose cost depends on the verdict (outputs.sc_for)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv)
    model = args.model if args.model == "untrained" else str(Path(args.model).resolve())
    args.model = model
    work = Path(tempfile.mkdtemp(prefix="triage-e2e-"))
    busy = busy_warning()
    try:
        args.cycle = None
        if args.flagged_share is not None:  # the burst, the paced series, the backfill and the bare loop: one mix
            args.cycle = mix(*flagged_sources(model, args.set), args.flagged_share)
        bare_files = make_instances(args.bare, work / "bare", "bare", cycle=args.cycle)
        phase(f"bare loop over {args.bare}")
        bare = bare_loop(model, bare_files)
        runs = {}
        for label, code in ([("baseline", args.baseline.resolve())] if args.baseline else []) + [("current", ROOT)]:
            r = run_node(args, code, label, bare["version"], work / label,
                         args.baseline_set if label == "baseline" else args.set)
            r["settings"] = args.baseline_set if label == "baseline" else args.set
            phase(f"{label}: stage profile over {args.stages}")
            r["cpu_ms_per_cxr_by_stage"] = stage_profile(code, model, bare_files[:args.stages], work / label)
            node_total = r["cpu_ms_per_cxr_by_process"]["node_total"]
            # what the node spends on top of the bare loop's decode + model, and everything but the model
            r["added_cpu_ms_per_cxr"] = round(node_total - bare["cpu_ms_per_cxr"], 1)
            r["non_model_cpu_ms_per_cxr"] = round(r["added_cpu_ms_per_cxr"] + bare["decode_cpu_ms_per_cxr"], 1)
            r["sustained"]["ratio_to_bare"] = round(r["sustained"]["results_per_s"] / bare["cxr_per_s"], 2)
            if "backfill" in r:
                r["backfill"]["ratio_to_sustained"] = round(
                    r["backfill"]["results_per_s"] / r["sustained"]["results_per_s"], 2)
            runs[label] = r
        res = {"suite": "e2e", "bare": bare, **runs, "cpus": os.cpu_count(), "scu_stalls_resent": Scu.stalls,
               "machine_busy": bool(busy), "ts": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "flagged_share_requested": args.flagged_share,
               "command": "python bench/e2e.py " + " ".join(argv if argv is not None else sys.argv[1:])}
        if "baseline" in runs:
            b, c = runs["baseline"], runs["current"]
            res["after_over_before"] = {
                "results_per_s": round(c["sustained"]["results_per_s"] / b["sustained"]["results_per_s"], 2),
                "non_model_cpu": round(c["non_model_cpu_ms_per_cxr"] / max(b["non_model_cpu_ms_per_cxr"], 1e-9), 2),
                "paced_p95": round((c["paced"]["latency_s"]["p95"] or 0) / max(b["paced"]["latency_s"]["p95"] or 1e-9,
                                                                               1e-9), 2),
            }
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "e2e.json").write_text(json.dumps(res, indent=1))
        print(json.dumps(res, indent=1))
        if busy:
            print(busy)
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    sys.exit(main())
