"""``triage-node up | serve | worker | analyze | replay | reconcile | status | train | evaluate | cv-report |
calibrate | age-gate | synth``.

Errors are translated to exit codes here: 0 ok, 1 failure, 2 usage / not eligible / bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from . import config as config_mod
from .audit import Audit
from .errors import TriageError

log = logging.getLogger("triage_node")


def _load(args) -> config_mod.Config:
    cfg = config_mod.load(getattr(args, "config", None))
    broker = getattr(args, "broker", None)
    if broker:
        cfg = replace(cfg, broker=replace(cfg.broker, url=broker))
    if getattr(args, "port", None):
        cfg = replace(cfg, receiver=replace(cfg.receiver, port=args.port))
    if getattr(args, "model", None):
        cfg = replace(cfg, model=replace(cfg.model, path=args.model))
    logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # per-module copy chatter
    if cfg.log_level.upper() != "DEBUG":  # one INFO line per PDU exchange; the audit trail records every instance
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    return cfg


def _spool(cfg):
    from .spool import Spool

    return Spool.from_config(cfg)


def _submitter(cfg):
    from .enqueue import make_submitter

    return make_submitter(cfg)


def reconcile(cfg, spool, submit_fn, older_than_s: float, touch: bool = False, reason: str = "restart",
              include_unacked: bool = True) -> int:
    """Re-enqueue spooled instances (older than ``older_than_s``) that no task in the broker refers to any more:
    left by a crash, a lost non-persistent queue, or a task that failed while the broker was down.

    Instances still queued or being worked on are skipped (a backlog longer than the visibility timeout must not
    be analysed twice). Over-submitting stays safe: a task whose spool file is gone is a no-op and output UIDs are
    deterministic. ``touch`` refreshes the mtime of what was re-enqueued, so a periodic sweep re-sends each file at
    most once per period. ``include_unacked`` False: tasks delivered but not acknowledged count as lost (start-up with
    a private broker, whose workers died with the node). A poison instance (``retry.max_attempts`` failures, or as
    many tasks started on it that never finished) is dead-lettered instead of re-enqueued.
    """
    from .queue import broker_held_sops

    old = spool.pending(older_than_s=older_than_s)
    if not old:
        return 0
    held = broker_held_sops(cfg, include_unacked=include_unacked) or set()
    audit = Audit.from_config(cfg)
    n = kept = poisoned = 0
    for path in old:
        if path.stem in held:
            kept += 1
            continue
        why = spool.poison(path.stem, cfg.retry.max_attempts)
        if why:  # failed or crashed its workers too often: never re-enqueued, dead-lettered with the reason
            target = spool.dead_letter(path.stem, why, extra={"stage": "reconcile"})
            audit.record("dead_lettered", sop_instance_uid=path.stem, stage="reconcile", reason=why, path=str(target))
            poisoned += 1
            continue
        try:
            submit_fn(str(path), path.stem, path.stat().st_mtime)
            if touch:
                os.utime(path)
        except FileNotFoundError:
            continue  # finished meanwhile (a worker discarded it after the scan)
        n += 1
    log.info("reconcile (%s): re-enqueued %d spooled instance(s), %d still held by the broker, %d poison "
             "dead-lettered", reason, n, kept, poisoned)
    audit.record("reconciled", count=n, held_by_broker=kept, poisoned=poisoned, reason=reason)
    return n


class _Stops(Protocol):
    def stop(self) -> None: ...


class _Sweep:
    """The receiver host's periodic reconcile (``up`` and ``serve``).

    An instance no task holds any more (queue lost with a non-persistent broker, a task that failed while the broker
    was down, an unexpected exception, a worker on another host that could not release it) would otherwise wait for
    the next restart. Every ``broker.visibility_timeout`` it re-enqueues what has sat in the spool longer than that
    and that no queued or unacknowledged task refers to (a long backlog is not work lost), touching it so each file
    is re-submitted at most once per period; a duplicate task finds the file gone and is a no-op."""

    def __init__(self, cfg, spool, submit_fn, now: bool = False) -> None:
        self.cfg, self.spool, self.submit_fn = cfg, spool, submit_fn
        self.next = time.time() + (0 if now else cfg.broker.visibility_timeout)
        self.reason = "restart" if now else "periodic sweep"

    def maybe(self) -> None:
        if time.time() < self.next:
            return
        try:
            reconcile(self.cfg, self.spool, self.submit_fn, self.cfg.broker.visibility_timeout, touch=True,
                      reason=self.reason)
        except Exception as exc:  # broker still down: try again next period
            log.warning("periodic reconcile failed: %s", exc)
        self.reason = "periodic sweep"
        self.next = time.time() + self.cfg.broker.visibility_timeout


class _Stoppable:
    def __init__(self, stop: Callable[[], None]) -> None:
        self.stop = stop


def start_instances(cfg, spool, audit) -> list[_Stops]:
    """The spool over HTTP for workers on other hosts (``[instances] url`` set); [] when off."""
    if not cfg.instances.url:
        return []
    from .transport.instances import InstanceServer

    srv = InstanceServer(cfg.instances, spool, audit).start()
    print(f"triage-node: instances served on http://{cfg.instances.bind}:{srv.port}/instances/ "
          f"(advertised as {cfg.instances.url})", flush=True)
    return [srv]


def _start_monitor(cfg, audit) -> _Stops:
    """The drift monitor (docs/monitoring.md): one per receiver host."""
    from .monitoring.monitor import Monitor

    return Monitor(cfg, audit).start()


def start_dicomweb(cfg, ingest, spool) -> list[_Stops]:
    """STOW-RS endpoint and/or QIDO/WADO pull, when configured; both feed the receiver's ingest gate."""
    from .transport.dicomweb_in import Puller, start_stow

    extras: list[_Stops] = []
    if cfg.dicomweb.enabled:
        srv = start_stow(cfg.dicomweb, ingest)
        extras.append(_Stoppable(srv.shutdown))
        print(f"triage-node up: STOW-RS on http://{cfg.dicomweb.bind}:{srv.server_port}/studies", flush=True)
    if cfg.pull.url:
        extras.append(Puller(cfg.pull, ingest, spool.root / "pull-state.sqlite").start())
        print(f"triage-node up: pulling CR/DX from {cfg.pull.url} every {cfg.pull.interval_s:.0f} s", flush=True)
    return extras


def cmd_up(args) -> int:
    """Receiver + workers (+ a private Redis when no broker is configured) on this machine."""
    from .services import PrivateRedis, child_env, start_workers, stop_all

    cfg = _load(args)
    if cfg.web.enabled:
        from . import web

        web.check_config(cfg)  # refuse an unsafe [web] before starting anything
    redis = None
    private = not cfg.broker.url
    if private:
        redis = PrivateRedis(Path(cfg.spool.directory).parent / "redis", persist=True).start()
        cfg = replace(cfg, broker=replace(cfg.broker, url=redis.url))
        (redis.dir / "url").write_text(redis.url + "\n")  # for `triage-node mode` (monitoring.mode.broker_url)
    log_dir = Path(cfg.spool.directory).parent / "log"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = child_env(TRIAGE_BROKER_URL=cfg.broker.url,
                    TRIAGE_CONFIG=str(Path(args.config).resolve()) if args.config else "",
                    TRIAGE_MODEL_PATH=cfg.model.path,
                    # OpenMP/OpenBLAS pools spin on idle cores: one thread per process unless the operator says
                    # otherwise (model.threads, measured in bench/e2e.py; see docs/performance.md)
                    OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS")
                    or (str(cfg.model.threads) if cfg.model.threads > 0 else ""))
    def launch_workers() -> list:
        return start_workers(env, log_dir=log_dir, batch_size=cfg.model.batch_size, processes=cfg.model.processes,
                             report_processes=cfg.outputs.report_processes,
                             report_threads=cfg.outputs.report_threads)

    workers = launch_workers()
    spool, audit = _spool(cfg), Audit.from_config(cfg)
    submit_fn = _submitter(cfg)
    extras = start_instances(cfg, spool, audit)  # before anything is enqueued: every task names this server
    reconcile(cfg, spool, submit_fn, older_than_s=0 if private else cfg.broker.visibility_timeout,
              include_unacked=not private)
    server, receivers = start_receivers(cfg, args, spool, submit_fn, audit, env, log_dir)
    extras += start_dicomweb(cfg, server.ingest, spool)
    extras.append(_start_monitor(cfg, audit))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"triage-node up: {cfg.receiver.ae_title}@{cfg.receiver.bind}:{cfg.receiver.port}, broker {cfg.broker.url}"
          f"{' (private)' if private else ''}, workers logs in {log_dir}", flush=True)
    web_srv = None
    try:
        if cfg.web.enabled:
            web_srv = web.start(cfg, spool, audit)
            print(f"triage-node up: dashboard, /metrics, /readyz on {web_srv.url if web_srv else 'NOT started'}",
                  flush=True)
        sweep = _Sweep(cfg, spool, submit_fn)
        while not stop.wait(1.0):
            sweep.maybe()
            if receivers:
                receivers.check()
            dead = [w for w in workers if w.poll() is not None]
            if dead:
                log.error("a worker exited (code %s); restarting workers", dead[0].returncode)
                stop_all(workers)
                workers = launch_workers()
    finally:
        print("triage-node: shutting down", flush=True)
        if web_srv:
            web_srv.stop()
        for extra in extras:
            extra.stop()
        server.shutdown()
        if receivers:
            receivers.stop()
        spool.close()
        stop_all(workers)
        if redis:
            redis.stop()
    return 0


def start_receivers(cfg, args, spool, submit_fn, audit, env: dict[str, str], log_dir: Path | None):
    """The receiver in this process, plus ``receiver.processes - 1`` receiver processes on the same port.

    Returns (the in-process server, the ReceiverPool or None)."""
    from .services import ReceiverPool
    from .transport import scp
    from .transport.scp_server import listen_socket

    rc = cfg.receiver
    sock = listen_socket(rc.bind, rc.port, reuse_port=rc.balance == "reuseport")
    pool = None
    if rc.processes > 1:
        env = dict(env, TRIAGE_PORT=str(sock.getsockname()[1]), TRIAGE_BROKER_URL=cfg.broker.url)
        config_path = str(Path(args.config).resolve()) if getattr(args, "config", None) else None
        pool = ReceiverPool(rc.processes - 1, env, config_path, sock if rc.balance == "shared" else None,
                            log_dir).start()
    server = scp.start(cfg, spool, submit_fn, audit, block=False, sock=sock)
    return server, pool


def cmd_serve(args) -> int:
    """The C-STORE receiver only (``receiver.processes`` of them on one port); ``--child``: one of them."""
    import socket

    from .services import child_env
    from .transport import scp

    cfg = _load(args)
    spool, audit = _spool(cfg), Audit.from_config(cfg)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    extras, sweep = [], None
    submit_fn = _submitter(cfg)
    if args.child:
        sock = socket.socket(fileno=args.listen_fd) if args.listen_fd is not None else None
        server, pool = scp.start(cfg, spool, submit_fn, audit, block=False, sock=sock), None
    else:
        extras = start_instances(cfg, spool, audit)  # one per host: the children share this spool
        extras.append(_start_monitor(cfg, audit))
        server, pool = start_receivers(cfg, args, spool, submit_fn, audit, child_env(), None)
        sweep = _Sweep(cfg, spool, submit_fn, now=True)  # the spool's owner re-enqueues what no task holds
    parent = os.getppid()
    try:
        while not stop.wait(1.0):
            if sweep:
                sweep.maybe()
            if pool:
                pool.check()
            if args.child and os.getppid() != parent:  # the supervisor died: free the port for its restart
                log.error("receiver supervisor %d is gone; this receiver process stops", parent)
                break
    finally:
        server.shutdown()
        _drain(server, 5.0)
        if pool:
            pool.stop()
        for extra in extras:
            extra.stop()
        spool.close()  # this process's pre-created tmp files (after the drain: no write in flight)
    return 0


def _drain(server, timeout: float) -> None:
    """Give associations in progress up to ``timeout`` s to finish (their senders get their responses)."""
    deadline = time.time() + timeout
    while server.active_associations and time.time() < deadline:
        time.sleep(0.05)


def cmd_backfill(args) -> int:
    """Re-analyse an archive through QIDO-RS/WADO-RS into this node's spool and queue (see backfill.py)."""
    from .backfill import Backfill, DoneSet
    from .ingest import Ingest

    cfg = _load(args)
    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)  # one INFO line per request otherwise
    b = cfg.backfill
    b = replace(b, **{k: v for k, v in {
        "url": args.url, "modalities": tuple(args.modality) if args.modality else None,
        "body_parts": tuple(args.body_part) if args.body_part else None, "concurrency": args.concurrency,
        "rate_limit": args.rate, "state": args.state}.items() if v is not None})
    if not b.url:
        raise TriageError("backfill: no archive URL (--url or [backfill] url)")
    if not cfg.broker.url:  # beside `triage-node up` with its private Redis
        url_file = Path(cfg.spool.directory).parent / "redis" / "url"
        if not url_file.exists():
            raise TriageError("backfill: no broker (--broker, [broker] url, or a running `triage-node up`)")
        cfg = replace(cfg, broker=replace(cfg.broker, url=url_file.read_text().strip()))
    spool, audit = _spool(cfg), Audit.from_config(cfg)
    done = DoneSet(b.state or Path(cfg.spool.directory) / "backfill.sqlite")
    date_range = f"{args.date_from or ''}-{args.date_to or ''}" if (args.date_from or args.date_to) else ""
    job = Backfill(b, Ingest(cfg, spool, _submitter(cfg), audit), done, date_range=date_range, limit=args.limit,
                   max_backlog=args.max_backlog, progress=not args.no_progress)
    audit.record("backfill_started", url=b.url, dates=date_range, modalities=list(b.modalities))
    summary = job.run()
    audit.record("backfill_finished", studies=summary.studies, found=summary.found,
                 already_done=summary.already_done, wall_s=round(summary.wall_s, 2), requests=summary.requests,
                 interrupted=summary.interrupted, **summary.outcomes)
    for line in summary.lines(b.rate_limit):
        print(line, flush=True)
    failed = summary.outcomes.get("error", 0) + summary.outcomes.get("deferred", 0)
    return 130 if summary.interrupted and args.limit is None else 1 if failed else 0


def cmd_worker(args) -> int:
    import os

    from .services import worker_command

    cfg = _load(args)
    env = dict(os.environ, TRIAGE_BROKER_URL=cfg.broker.url)
    if args.config:
        env["TRIAGE_CONFIG"] = str(Path(args.config).resolve())
    pool = args.pool or ("prefork" if args.queue == "infer" else "threads")
    cmd = worker_command(args.queue, args.concurrency or (1 if args.queue == "infer" else cfg.outputs.report_threads),
                         pool)
    os.execvpe(cmd[0], cmd, env)
    return 1


def cmd_analyze(args) -> int:
    """The no-broker path: one file through the same pipeline, results into a folder."""
    from . import pipeline

    cfg = _load(args)
    out = Path(args.out)
    pred = pipeline.analyze(args.file, cfg)
    files = pipeline.build(args.file, pred, cfg, out)
    summary = {
        "model": pred.model.label,
        "probability": round(pred.probability, 4),
        "threshold": pred.threshold,
        **({"operating_point": pred.operating_point} if pred.operating_point else {}),
        "finding": "pneumonia-like opacity" if pred.positive else "no opacity detected",
        "boxes": [{"x": round(d.x), "y": round(d.y), "width": round(d.width), "height": round(d.height),
                   "score": round(d.score, 3)} for d in pred.detections],
        "files": [str(f) for f in files] + ([str(out / "preview.png")] if (out / "preview.png").exists() else []),
    }
    print(json.dumps(summary, indent=2))
    return 0


def cmd_replay(args) -> int:
    """Resend dead-lettered results; ones that succeed leave the dead-letter folder."""
    from .replay import replay_one

    cfg = _load(args)
    spool, audit = _spool(cfg), Audit.from_config(cfg)
    failed = 0
    for info in spool.dead_letters():
        if args.uid and info["sop_instance_uid"] not in args.uid:
            continue
        res = replay_one(cfg, audit, info)
        failed += res.outcome == "failed"
        print(f"{res.sop_instance_uid}: {res.message}")
    return 1 if failed else 0


def cmd_reconcile(args) -> int:
    cfg = _load(args)
    n = reconcile(cfg, _spool(cfg), _submitter(cfg), older_than_s=args.older_than)
    print(f"re-enqueued {n} instance(s)")
    return 0


def cmd_status(args) -> int:
    from .status import summarise

    cfg = _load(args)
    print(summarise(cfg, _spool(cfg), last_s=args.last))
    return 0


def cmd_mode(args) -> int:
    """Show or switch live / shadow on a running node (no restart; audited)."""
    from .monitoring import mode

    cfg = _load(args)
    if args.mode:
        try:
            now = mode.set_mode(cfg, args.mode, Audit.from_config(cfg), who=args.by)
        except (RuntimeError, ValueError) as exc:
            print(f"triage-node mode: {exc}", file=sys.stderr)
            return 2
        print(f"outputs mode: {now.upper()}" + (" (nothing is sent to PACS or flag channels)" if now == "shadow"
                                                 else ""))
        return 0
    current, source = mode.current(cfg, strict=False)
    print(f"outputs mode: {current.upper()} ({source})")
    return 0


def _delegate(module: str):
    def run(args) -> int:
        import importlib

        mod = importlib.import_module(module)
        return int(mod.main(mod.get_args_parser().parse_args(args.rest)) or 0)

    return run


# Subcommands with their own torchvision-style parsers (argparse.REMAINDER would swallow their --options).
_DELEGATED = {
    "train": ("triage_node.training.classifier_train", "train the classifier + CAM localiser on image-level CSVs"),
    "evaluate": ("triage_node.training.evaluate", "AUC (bootstrap CI), operating point, per view, localisation"),
    "cv-report": ("triage_node.training.cv_report", "pool k-fold train --cv runs: out-of-fold AUC, epoch, threshold"),
    "calibrate": ("triage_node.training.calibrate", "choose and package an age-specific (pediatric) operating point; "
                  "--site: a site operating point from this site's validated films (triage_node.monitoring.site_cli)"),
    "validate": ("triage_node.validate.cli", "join the site's ground truth (CSV or HL7 ORU reports) with what the node "
                 "recorded: AUC, sensitivity/specificity, subgroups, calibration, HTML + JSON report"),
    "age-gate": ("triage_node.training.age_gate", "package an adult model with a pediatric gate routed by age"),
    "train-detector": ("triage_node.training.detector_train", "train the FCOS detector on RSNA-format boxes"),
    "evaluate-boxes": ("triage_node.training.evaluate_boxes", "RSNA metric / mAP ablation on RSNA-format boxes"),
    "synth": ("triage_node.training.synth", "write synthetic RSNA-format DICOM data"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="triage-node", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    def add(name, fn, help_):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--config", help="TOML configuration file (default: $TRIAGE_CONFIG or embedded defaults)")
        sp.set_defaults(fn=fn)
        return sp

    sp = add("up", cmd_up, "receiver + workers (+ private Redis) on this machine")
    sp.add_argument("--broker", help="redis://host:port/db shared by receivers and workers on several hosts")
    sp.add_argument("--port", type=int)
    sp.add_argument("--model", help="model package directory ('untrained' for random weights)")
    sp = add("serve", cmd_serve, "the C-STORE receiver only")
    sp.add_argument("--broker")
    sp.add_argument("--port", type=int)
    sp.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one receiver of a pool
    sp.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)  # the pool's shared listening socket
    sp = add("backfill", cmd_backfill, "re-analyse an archive through DICOMweb (QIDO-RS + WADO-RS)")
    sp.add_argument("--url", help="DICOMweb base URL of the archive")
    sp.add_argument("--broker")
    sp.add_argument("--from", dest="date_from", help="first StudyDate, YYYYMMDD")
    sp.add_argument("--to", dest="date_to", help="last StudyDate, YYYYMMDD")
    sp.add_argument("--modality", action="append", help="CR, DX, ... (repeatable; default [backfill] modalities)")
    sp.add_argument("--body-part", action="append", help="series BodyPartExamined to take (repeatable)")
    sp.add_argument("--concurrency", type=int, help="parallel retrievals")
    sp.add_argument("--rate", type=float, help="DICOMweb requests per second at most (0 = no limit)")
    sp.add_argument("--max-backlog", type=int, default=500, help="pause while the queue holds more tasks (0 = off)")
    sp.add_argument("--limit", type=int, help="stop after handing this many instances to the node")
    sp.add_argument("--state", help="done-set file (default <spool>/backfill.sqlite)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp = add("worker", cmd_worker, "a Celery worker for one queue")
    sp.add_argument("--broker")
    sp.add_argument("--queue", choices=["infer", "report"], default="infer")
    sp.add_argument("--pool", choices=["prefork", "solo", "threads"])
    sp.add_argument("--concurrency", type=int)
    sp = add("analyze", cmd_analyze, "analyse one DICOM file without a broker")
    sp.add_argument("file")
    sp.add_argument("--out", required=True)
    sp.add_argument("--model")
    sp = add("replay", cmd_replay, "resend dead-lettered results")
    sp.add_argument("uid", nargs="*", help="only these SOP Instance UIDs")
    sp = add("reconcile", cmd_reconcile, "re-enqueue spooled instances left by a crash")
    sp.add_argument("--broker")
    sp.add_argument("--older-than", type=float, default=0.0)
    sp = add("status", cmd_status, "summary of the audit log, spool and dead letters")
    sp.add_argument("--last", type=float, default=3600.0, help="window in seconds")
    sp = add("mode", cmd_mode, "show or switch the outputs mode of a running node: live | shadow | default")
    sp.add_argument("mode", nargs="?", choices=["live", "shadow", "default"])
    sp.add_argument("--by", help="who switches (audited; default: the login name)")
    for name, (module, help_) in _DELEGATED.items():
        sp = sub.add_parser(name, help=help_, add_help=False)
        sp.add_argument("rest", nargs=argparse.REMAINDER)
        sp.set_defaults(fn=_delegate(module))
    return p




def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in _DELEGATED:  # their own parsers (argparse.REMAINDER would swallow --options)
        import importlib

        site = argv[0] == "calibrate" and "--site" in argv  # torch-free: from the audit trail's recorded scores
        mod = importlib.import_module("triage_node.monitoring.site_cli" if site else _DELEGATED[argv[0]][0])
        return int(mod.main(mod.get_args_parser().parse_args(argv[1:])) or 0)
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except TriageError as exc:
        print(f"triage-node: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
