"""``triage-node validate``: how the model does on this site's films, against the site's own ground truth.

    triage-node validate --config node.toml --truth labels.csv --out var/validation/2026-12
    triage-node validate --config node.toml --oru reports/ --out var/validation/2026-12
    triage-node validate --config node.toml --listen-mllp 2575 --listen-seconds 600 --oru reports/ --out ...

Exit status: 0, or 1 when some input was rejected (each named on stderr and in the report; the rest is used),
2 when nothing could be joined.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from .. import config as config_mod
from .report import join, measure, recorded_films
from .truth import Truth, parse_oru, read_csv, read_oru_folder, split_messages

log = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="triage-node validate",
                                description="Validate the node's recorded results against the site's ground truth",
                                add_help=add_help)
    p.add_argument("--config", help="the node's TOML configuration (its audit trail is what is joined)")
    p.add_argument("--audit", help="audit trail to read instead of the configured one")
    p.add_argument("--truth", action="append", default=[], help="CSV: sop_instance_uid or accession_number, label")
    p.add_argument("--oru", help="folder of HL7 ORU^R01 reports (labelled by the keyword rule)")
    p.add_argument("--listen-mllp", type=int, metavar="PORT",
                   help="first receive ORU^R01 over MLLP on this port into --oru (ACK AA, AE for a bad message)")
    p.add_argument("--listen-bind", default="127.0.0.1")
    p.add_argument("--listen-seconds", type=float, default=60.0, help="how long to listen")
    p.add_argument("--model-label", help="measure the films of this model (default: the latest one)")
    p.add_argument("--out", default="var/validation", help="folder for report.html, report.json and the PNGs")
    return p


def collect(truth: Truth, args: argparse.Namespace) -> list[str]:
    """Read every ground-truth source named by ``args`` into ``truth``; returns their descriptions."""
    sources = []
    for csv_path in args.truth:
        read_csv(csv_path, truth)
        sources.append(str(csv_path))
    if args.oru:
        read_oru_folder(args.oru, truth)
        sources.append(f"HL7 ORU^R01 in {args.oru} (keyword rule)")
    return sources


def listen_mllp(bind: str, port: int, folder: Path, seconds: float, ready: threading.Event | None = None) -> int:
    """Receive MLLP messages for ``seconds`` into ``folder`` (one file per message); ACK AA when it parses as an
    ORU^R01 with a key and text, AE naming the problem otherwise (the file is kept: validate names it too)."""
    folder.mkdir(parents=True, exist_ok=True)
    srv = socket.create_server((bind, port))
    srv.settimeout(0.5)
    if ready is not None:
        ready.set()
    n, deadline = 0, time.time() + seconds
    try:
        while time.time() < deadline:
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                buf = b""
                while True:
                    while b"\x1c\r" not in buf:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        buf += chunk
                    if b"\x1c\r" not in buf:
                        break
                    frame, buf = buf.split(b"\x1c\r", 1)
                    text = frame.lstrip(b"\x0b").decode("utf-8", "replace")
                    n += 1
                    (folder / f"mllp-{time.strftime('%Y%m%dT%H%M%S')}-{n:05d}.hl7").write_text(text)
                    conn.sendall(b"\x0b" + _ack(text).encode() + b"\x1c\r")
    finally:
        srv.close()
    return n


def _ack(text: str) -> str:
    msgs = split_messages(text)
    code, why, control = "AA", "", ""
    try:
        r = parse_oru(msgs[0] if msgs else "")
        control = str(r["control_id"])
    except ValueError as exc:
        code, why = "AE", str(exc)
        parts = (msgs[0] if msgs else "").split("\r")[0].split("|")
        control = parts[9] if len(parts) > 9 else ""
    ts = time.strftime("%Y%m%d%H%M%S")
    return (f"MSH|^~\\&|CXR-TRIAGE|VALIDATE|||{ts}||ACK^R01|{uuid.uuid4().hex[:20]}|P|2.5.1\r"
            f"MSA|{code}|{control}|{why[:80].replace('|', ' ')}\r")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    cfg = config_mod.load(args.config)
    if args.listen_mllp:
        if not args.oru:
            raise SystemExit("--listen-mllp needs --oru FOLDER to keep the messages in")
        n = listen_mllp(args.listen_bind, args.listen_mllp, Path(args.oru), args.listen_seconds)
        print(f"received {n} HL7 message(s) into {args.oru}")
    if not args.truth and not args.oru:
        raise SystemExit("give ground truth: --truth CSV and/or --oru FOLDER")
    truth = Truth()
    sources = collect(truth, args)
    films, model, models = recorded_films(args.audit or cfg.audit_log, args.model_label)
    labelled = join(films, truth)
    for e in truth.errors:
        print(f"validate: {e}", file=sys.stderr)
    if not labelled:
        print(f"validate: no film of the ground truth was found among the {len(films)} film(s) the node recorded "
              f"for model {model!r}", file=sys.stderr)
        return 2
    from .render import write_all

    report = measure(labelled, model, truth)
    report["truth_sources"] = sources
    report["models_in_audit"] = models
    if len(models) > 1:
        report["warning"] = (f"the audit trail holds films of {len(models)} models; only those of {model} are "
                             "measured (--model-label to choose)")
    page = write_all(report, Path(args.out))
    o = report["overall"]
    print(f"{o['n']} films ({o['positives']} pos): AUC {o['auc']:.3f} [{o['auc_ci95'][0]:.3f}, "
          f"{o['auc_ci95'][1]:.3f}]; sensitivity {o['sensitivity']:.3f}, specificity {o['specificity']:.3f}; "
          f"{len(report['discordant'])} discordant; report {page}")
    return 1 if truth.errors else 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
