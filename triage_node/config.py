"""Node configuration: frozen dataclasses read from one TOML file plus a few ``TRIAGE_*`` environment overrides.

Nothing else in the package reads ``os.environ``. Every field has an embedded default so ``triage-node up`` works
with no file at all.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

ENV_OVERRIDES = {
    "TRIAGE_BROKER_URL": ("broker", "url"),
    "TRIAGE_BROKER_TASK_EVENTS": ("broker", "task_events"),
    "TRIAGE_SPOOL_DIR": ("spool", "directory"),
    "TRIAGE_SPOOL_MAX_DISK_USAGE": ("spool", "max_disk_usage"),
    "TRIAGE_SPOOL_RESERVE_MB": ("spool", "reserve_mb"),
    "TRIAGE_MODEL_PATH": ("model", "path"),
    "TRIAGE_DEVICE": ("model", "device"),
    "TRIAGE_MODEL_THREADS": ("model", "threads"),
    "TRIAGE_MODEL_PROCESSES": ("model", "processes"),
    "TRIAGE_MODEL_BATCH_SIZE": ("model", "batch_size"),
    "TRIAGE_PORT": ("receiver", "port"),
    "TRIAGE_AE_TITLE": ("receiver", "ae_title"),
    "TRIAGE_RECEIVER_PROCESSES": ("receiver", "processes"),
    "TRIAGE_WEB_PORT": ("web", "port"),
    "TRIAGE_WEB_PASSWORD": ("web", "password"),
    "TRIAGE_WEB_RECEIVER": ("web", "receiver_address"),
    "TRIAGE_DEAD_LETTER_DIR": ("retry", "dead_letter_dir"),
    "TRIAGE_ARCHIVE_DIR": ("outputs", "archive_dir"),
    "TRIAGE_REPORT_PROCESSES": ("outputs", "report_processes"),
    "TRIAGE_OUTPUTS_MODE": ("outputs", "mode"),
    "TRIAGE_MONITORING_STATISTICS": ("monitoring", "input_statistics"),
    "TRIAGE_AUDIT_LOG": ("", "audit_log"),
    "TRIAGE_INSTANCES_URL": ("instances", "url"),
    "TRIAGE_INSTANCES_BIND": ("instances", "bind"),
    "TRIAGE_INSTANCES_PORT": ("instances", "port"),
    "TRIAGE_INSTANCES_TOKEN": ("instances", "token"),
}


@dataclass(frozen=True)
class ReceiverConfig:
    ae_title: str = "TRIAGE"
    bind: str = "127.0.0.1"
    port: int = 11112
    #: Calling AE titles allowed to associate; empty tuple = any (only sensible on a closed network).
    allowed_calling_aets: tuple[str, ...] = ()
    #: Reject associations whose Called AE Title is not ours.
    require_called_aet: bool = True
    #: Concurrent associations per receiver process (pynetdicom answers A-ASSOCIATE-RJ beyond it).
    max_associations: int = 10
    #: Concurrent connections from one IP address per receiver process; more are closed at once (audited), so one
    #: peer, hostile or stuck, cannot hold every slot. 0 = no cap.
    max_associations_per_address: int = 5
    max_pdu: int = 262144
    #: Seconds a connection may take to send its A-ASSOCIATE-RQ (an idle TCP connection holds a slot that long).
    acse_timeout: float = 10.0
    dimse_timeout: float = 60.0
    #: Idle timeout: an association (or a socket inside a PDU) that receives no byte for this long is aborted.
    #: Every chunk received counts, so a slow but steady sender is never cut off; only silence is.
    network_timeout: float = 30.0
    #: Receiver processes sharing the port (each a Python process with its own GIL); 1 = in the node's process.
    processes: int = 1
    #: How the processes share the port: ``shared`` (one listening socket, the least busy process accepts first;
    #: a killed process loses nothing queued) or ``reuseport`` (SO_REUSEPORT, the kernel hashes connections).
    balance: str = "shared"
    #: DICOM TLS (PS3.15 B.9 / BCP 195): the receiver speaks TLS when a certificate and key are given.
    tls_cert: str = ""
    tls_key: str = ""
    #: CA bundle to verify client certificates against; set = mutual TLS (clients without a valid cert are refused).
    tls_ca: str = ""

    def __post_init__(self) -> None:
        if self.balance not in ("shared", "reuseport"):
            raise ValueError(f"receiver.balance {self.balance!r}: expected 'shared' or 'reuseport'")
        if self.processes < 1:
            raise ValueError("receiver.processes must be >= 1")


@dataclass(frozen=True)
class SpoolConfig:
    directory: str = "var/spool"
    #: The intake guard: new instances are refused (0xA700 to a C-STORE; a DICOMweb pull leaves them for its next
    #: poll; the reason audited) while the spool filesystem is at least this full (used / (used + available), as
    #: ``df`` shows it) ...
    max_disk_usage: float = 0.90
    #: ... or has less than this many MiB available: headroom for the work already acknowledged, whose results
    #: are still to be written. MONAI Deploy's informatics gateway guards the same two ways (watermarkPercent,
    #: reserveSpaceGB, 5 GB by default, sized at 2-3 studies per AE title; a CXR is 5-30 MB). The receiver
    #: accepts again by itself once either is clear. ``TRIAGE_SPOOL_MAX_DISK_USAGE``, ``TRIAGE_SPOOL_RESERVE_MB``.
    reserve_mb: int = 2048

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_disk_usage <= 1.0:
            raise ValueError(f"spool.max_disk_usage {self.max_disk_usage!r}: expected a fraction from 0 to 1")
        if self.reserve_mb < 0:
            raise ValueError(f"spool.reserve_mb {self.reserve_mb!r}: expected >= 0")


@dataclass(frozen=True)
class BrokerConfig:
    #: Empty: ``triage-node up`` starts a private redis-server and points everything at it.
    url: str = ""
    infer_queue: str = "infer"
    report_queue: str = "report"
    #: Seconds before an unacknowledged task of a worker that died is delivered again (Redis transport).
    visibility_timeout: int = 900
    #: Celery task events (task-sent/received/started/succeeded: what Flower and ``celery events`` show). Off saves
    #: ~1.5 ms of CPU per CXR (docs/performance.md), but only while no Flower runs: Flower turns the workers' events
    #: on when it starts (it still lists the tasks, without the sent state). The node's dashboard and metrics do not
    #: use them. ``TRIAGE_BROKER_TASK_EVENTS``.
    task_events: bool = True


@dataclass(frozen=True)
class EligibilityConfig:
    modalities: tuple[str, ...] = ("CR", "DX")
    body_parts: tuple[str, ...] = ("CHEST", "")
    views: tuple[str, ...] = ("PA", "AP")
    allow_lateral: bool = False
    allow_unknown_view: bool = True
    max_pixels: int = 50_000_000


@dataclass(frozen=True)
class ModelConfig:
    #: Model package directory; empty = the shipped demo model; "untrained" = random weights (tests only).
    path: str = ""
    device: str = "auto"
    #: > 1: the inference worker runs that many task threads feeding one micro-batcher (GPU: 32-64).
    #: 1: one prefork child per worker, one image at a time (a killed child's task is redelivered at once).
    batch_size: int = 1
    batch_wait_ms: int = 20
    #: torch intra-op threads per inference process on CPU (0: torch's default, one per core). One thread per
    #: process, and more worker processes for more cores, measured best: with torch's default the spinning
    #: OpenMP threads of a ResNet-18 take CPU from the report worker on the same cores (bench/e2e.py; 2 cores:
    #: 5.4 vs 3.5 results/s, and the bare model loop itself 7.6 vs 6.1 CXR/s). Ignored on a GPU.
    threads: int = 1
    #: Inference processes (prefork children of the infer worker, each with the model and ``threads`` threads)
    #: when ``batch_size`` is 1; more than one uses more cores on a CPU host (bench/e2e.py, docs/performance.md).
    processes: int = 1
    #: A site operating point written by ``triage-node calibrate --site`` (outside the package, which is never
    #: edited; it names the package's hash and is ignored, with a warning, for any other package). Empty = none.
    site_operating_point: str = "var/site/operating_point.json"

    def __post_init__(self) -> None:
        if self.processes < 1 or self.batch_size < 1:
            raise ValueError("model.processes and model.batch_size must be >= 1")


SC_TRANSFER_SYNTAXES = ("jpeg-ls-palette", "jpeg-ls", "rle-palette", "rle", "explicit", "jpeg")


@dataclass(frozen=True)
class OutputConfig:
    sr: bool = True
    sc: bool = True
    gsps: bool = False
    #: Also keep a copy of every result (and a PNG preview) here; empty = off.
    archive_dir: str = "var/results"
    #: Encoding of the SC overlay: ``jpeg-ls-palette`` (PALETTE COLOR, JPEG-LS lossless, ~0.25 MB for a 1024 x 1024
    #: overlay, the cheapest to encode: ~19 ms against ~42 ms for RGB), ``jpeg-ls`` (RGB, lossless, ~1 MB),
    #: ``rle-palette`` (PALETTE COLOR, RLE lossless: ~6 ms less CPU than ``jpeg-ls-palette`` but ~0.8 MB, 2.8x the
    #: bytes to send and store; for a PACS or viewer without JPEG-LS), ``rle`` (RGB, lossless, ~2.7 MB),
    #: ``explicit`` (RGB uncompressed Explicit VR Little Endian, 3 MB) or ``jpeg`` (JPEG Baseline, lossy, ~0.2 MB,
    #: marked Lossy Image Compression 01). A C-STORE peer that does not accept the
    #: compressed syntax gets the overlay decompressed to Explicit VR Little Endian on the same association.
    sc_transfer_syntax: str = "jpeg-ls-palette"
    #: Which films get the SC overlay: ``all`` (every analysed film; a film below the operating threshold gets its
    #: overlay without boxes, marked as such) or ``flagged`` (only films over the threshold; the others get the SR, and
    #: the GSPS when configured). The overlay is most of a result's CPU (~40 ms of ~80 ms of non-model CPU per CXR on
    #: the RSNA samples, docs/performance.md) and a series in every study; a negative film's overlay carries no box.
    sc_for: str = "all"
    #: Longest side of the SC overlay in pixels: a larger film's overlay is reduced to fit (aspect kept, boxes
    #: scaled; the SR and GSPS keep source coordinates). Render and encode cost grows with the pixels: a 2832 x 2328
    #: DX film cost 89 ms to JPEG-LS encode at full size (docs/performance.md). 0 = the source's size.
    sc_max_size: int = 2048
    #: Build and send the SR (and fire the flag channels) before the overlay and GSPS are built: the finding
    #: reaches the PACS without waiting for the image encodes (~90 ms per CXR on a CPU core). False: one phase.
    sr_first: bool = True
    #: Report worker processes started by ``triage-node up`` (Celery workers on the ``report`` queue, each with
    #: ``report_threads`` task threads; ``triage-node worker --queue report`` is one such process). Building the
    #: results is mostly Python and holds the GIL, so one process uses about one core at most; on a host with cores
    #: to spare, run more (bench/e2e.py, docs/performance.md).
    report_processes: int = 1
    #: Task threads per report worker process (``up``, and ``triage-node worker --queue report`` without
    #: ``--concurrency``): they overlap the sends' network waits with building.
    report_threads: int = 4
    #: ``live``: results go to the destinations and flag channels. ``shadow``: every film is analysed, its results
    #: built and kept under ``archive_dir`` and audited (score, input statistics), but nothing is sent to a PACS or
    #: a flag channel: local acceptance testing before clinical use. The default for ``triage-node mode``, which
    #: switches a running node (workers included, no restart) through the broker. ``TRIAGE_OUTPUTS_MODE``.
    mode: str = "live"

    def __post_init__(self) -> None:
        if self.mode not in ("live", "shadow"):
            raise ValueError(f"outputs.mode {self.mode!r}: expected 'live' or 'shadow'")
        if self.sc_max_size != 0 and self.sc_max_size < 256:
            raise ValueError("outputs.sc_max_size must be 0 (the source's size) or at least 256")
        if self.report_processes < 1 or self.report_threads < 1:
            raise ValueError("outputs.report_processes and outputs.report_threads must be >= 1")
        if self.sc_for not in ("all", "flagged"):
            raise ValueError(f"outputs.sc_for {self.sc_for!r}: expected 'all' or 'flagged'")
        if self.sc_transfer_syntax not in SC_TRANSFER_SYNTAXES:
            raise ValueError(f"outputs.sc_transfer_syntax {self.sc_transfer_syntax!r}: expected one of "
                             f"{', '.join(SC_TRANSFER_SYNTAXES)}")


@dataclass(frozen=True)
class Destination:
    """Where results go. ``kind``: ``dicom`` (C-STORE), ``stow`` (DICOMweb), ``folder``; and the triage flag
    channels ``hl7`` (ORU^R01 over MLLP at host:port), ``fhir`` (R4 transaction Bundle to url), ``webhook`` (JSON)."""

    name: str = "pacs"
    kind: str = "dicom"
    host: str = "127.0.0.1"
    port: int = 4242
    ae_title: str = "ORTHANC"
    calling_ae_title: str = "TRIAGE"
    url: str = ""
    username: str = ""
    password: str = ""
    token: str = ""
    path: str = ""
    #: Seconds: ``dicom``: association negotiation (ACSE) and the association's network idle timeout; ``hl7``,
    #: ``fhir``, ``webhook``: the whole exchange.
    timeout: float = 30.0
    #: ``dicom``: seconds to wait for each C-STORE response, counted from the moment the request is queued, so the
    #: object's transfer is included (raise it for large objects over slow links or a PACS slow to acknowledge).
    #: No response within it: the association is aborted and the object resent once at once on a new association; a
    #: second miss fails the send into the report task's retries.
    dimse_timeout: float = 10.0
    #: DICOM TLS to the destination: verify the peer against tls_ca; present tls_cert/tls_key when given.
    tls: bool = False
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    #: Flag channels: report only studies over the operating threshold (False: negatives are reported too).
    positives_only: bool = True
    #: DICOMweb base URL where the SR can be retrieved (the link carried by flags); empty = no link.
    sr_link_base: str = ""
    #: HL7: receiving application/facility (MSH-5/6).
    receiving_application: str = "RIS"
    receiving_facility: str = ""

    def __post_init__(self) -> None:
        if not self.dimse_timeout > 0 or not self.timeout > 0:
            raise ValueError(f"destination {self.name!r}: timeout and dimse_timeout must be > 0 seconds "
                             f"(got {self.timeout:g} and {self.dimse_timeout:g})")


@dataclass(frozen=True)
class RetryConfig:
    max_attempts: int = 5
    backoff_base_s: float = 2.0
    backoff_max_s: float = 300.0
    dead_letter_dir: str = "var/dead-letter"


@dataclass(frozen=True)
class WebConfig:
    """Ops dashboard, Prometheus /metrics and health endpoints served by ``triage-node up``."""

    enabled: bool = True
    bind: str = "127.0.0.1"
    port: int = 8484
    #: Required (HTTP basic) whenever ``bind`` is not a loopback address; never logged.
    username: str = ""
    password: str = ""
    #: ``host:port`` of the receiver when the dashboard runs apart from it (another container or host): /readyz then
    #: checks it with a DICOM C-ECHO (calling AE ``probe_ae_title``, which the receiver's ``allowed_calling_aets``
    #: must include when that list is set) instead of looking for a local listening socket.
    receiver_address: str = ""
    probe_ae_title: str = "TRIAGE-WEB"


@dataclass(frozen=True)
class DicomwebIngestConfig:
    """STOW-RS endpoint on the node (``POST /studies``) feeding the same spool and queue as the C-STORE receiver."""

    enabled: bool = False
    bind: str = "127.0.0.1"
    port: int = 8480
    #: HTTP basic and/or bearer token; one is required when ``bind`` is not loopback.
    username: str = ""
    password: str = ""
    token: str = ""
    max_request_bytes: int = 1 << 30


@dataclass(frozen=True)
class PullConfig:
    """Pull mode for PACS that cannot push: poll QIDO-RS, fetch new CR/DX instances with WADO-RS."""

    url: str = ""  # DICOMweb base URL; empty = off
    username: str = ""
    password: str = ""
    token: str = ""
    interval_s: float = 30.0
    modalities: tuple[str, ...] = ("CR", "DX")
    #: Earliest StudyDate the sweep fetches (YYYYMMDD: a backfill from that date). Empty: no date bound, and the
    #: first sweep takes what the archive already holds outside the window as a baseline (never fetched).
    since: str = ""
    #: Every poll re-reads StudyDate >= today minus this many days (nothing advances: the seen-set decides).
    lookback_days: int = 2
    #: A query without a date bound runs this often: late arrivals for older dates, instances without StudyDate.
    sweep_interval_s: float = 3600.0
    #: At most this many instances fetched per poll (keeps one poll short; the rest come next time).
    max_per_poll: int = 500


@dataclass(frozen=True)
class BackfillConfig:
    """``triage-node backfill``: re-analyse an archive through QIDO-RS + WADO-RS (each option has a CLI flag)."""

    url: str = ""  # DICOMweb base URL of the archive
    username: str = ""
    password: str = ""
    token: str = ""
    modalities: tuple[str, ...] = ("CR", "DX")
    #: Series-level BodyPartExamined values to take; empty = any (the ingest gate still applies its own rules).
    body_parts: tuple[str, ...] = ()
    #: Retrieve + ingest in parallel (bounded; the queue of pending work is at most twice this).
    concurrency: int = 4
    #: At most this many DICOMweb requests per second to the archive (0 = no limit).
    rate_limit: float = 20.0
    page_size: int = 100
    #: Done-set (sqlite); empty = ``<spool directory>/backfill.sqlite``.
    state: str = ""


@dataclass(frozen=True)
class InstancesConfig:
    """Instances reach workers on other hosts: the receiver serves its spool over HTTP (bearer token) and every
    task carries ``source_url``; a worker that cannot see the task's spool path fetches the bytes from there and
    tells the receiver when the instance is finished (docs/scaling.md). ``url`` empty: one shared filesystem."""

    #: Base URL workers reach this receiver's instance server at (``http://receiver-host:8490``); set on the
    #: receiver host, it starts the server beside the receiver and goes into every task. Empty = off (default).
    url: str = ""
    bind: str = "127.0.0.1"
    port: int = 8490
    #: Bearer token, required on both sides when ``url`` is set (compared in constant time); never logged.
    token: str = ""
    #: Worker side: seconds per HTTP request, and tries per fetch / release before the task's own retry takes over.
    timeout_s: float = 30.0
    attempts: int = 3

    def __post_init__(self) -> None:
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"instances.url {self.url!r}: expected an http:// or https:// base URL")
        if self.url and not self.token:
            raise ValueError("instances.url is set but instances.token is empty (TRIAGE_INSTANCES_TOKEN)")
        if self.attempts < 1:
            raise ValueError("instances.attempts must be >= 1")


@dataclass(frozen=True)
class MonitoringConfig:
    """Input and output drift against the model package's reference profile (docs/monitoring.md)."""

    #: Per-film input statistics (``inference.filmstats``) in the inference worker's audit line (~1.5 ms per film);
    #: off: no input drift, and ``bench/e2e.py --set monitoring.input_statistics=false`` measures their cost.
    input_statistics: bool = True
    #: The sliding window: the last ``window_films`` analysed films received in the last ``window_hours``.
    window_films: int = 500
    window_hours: float = 24.0
    #: No drift state changes before the window holds this many films (PSI of a small sample is biased upwards:
    #: about (bins - 1) / n with no drift at all; 10 bins and 100 films: ~0.09).
    min_films: int = 100
    #: Population stability index bands: below ``psi_watch`` stable, from ``psi_drift`` drift (the usual 0.1 / 0.25).
    psi_watch: float = 0.1
    psi_drift: float = 0.25
    #: Output drift: the window's flagged rate is out of band when the reference rate lies outside its Wilson
    #: interval at this z (2.576: 99 %).
    z: float = 2.576
    #: Seconds between evaluations by the monitor of ``up`` / ``serve`` (state changes audited, alerts sent).
    interval_s: float = 60.0
    #: Reference profile file; empty = ``reference_profile.json`` in the model package (or model.json's
    #: ``reference_profile``); none found: drift says "no reference profile".
    reference_profile: str = ""
    #: Flag channel destinations (by name, kinds hl7 / fhir / webhook) told once per drift state change.
    alert_to: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.window_films < 1 or self.min_films < 1 or not 0 < self.psi_watch <= self.psi_drift:
            raise ValueError("monitoring: window_films, min_films >= 1 and 0 < psi_watch <= psi_drift expected")


@dataclass(frozen=True)
class Config:
    receiver: ReceiverConfig = field(default_factory=ReceiverConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    eligibility: EligibilityConfig = field(default_factory=EligibilityConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    outputs: OutputConfig = field(default_factory=OutputConfig)
    destinations: tuple[Destination, ...] = (Destination(),)
    retry: RetryConfig = field(default_factory=RetryConfig)
    web: WebConfig = field(default_factory=WebConfig)
    dicomweb: DicomwebIngestConfig = field(default_factory=DicomwebIngestConfig)
    pull: PullConfig = field(default_factory=PullConfig)
    backfill: BackfillConfig = field(default_factory=BackfillConfig)
    instances: InstancesConfig = field(default_factory=InstancesConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    audit_log: str = "var/audit.jsonl"
    #: The active audit file is rotated (renamed ``<audit_log>.<UTC time>``) at this size; 0 = never.
    audit_max_bytes: int = 64 << 20
    #: Rotated audit files kept (oldest deleted first); 0 = keep all.
    audit_keep: int = 20
    #: fdatasync each (group-committed) batch of audit lines before the writer goes on (off: written, not synced).
    audit_fsync: bool = False
    log_level: str = "INFO"


def _build(cls: type, data: dict[str, Any]) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"unknown key(s) in [{cls.__name__}]: {', '.join(sorted(unknown))}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**kwargs)


_SECTIONS = {
    "receiver": ReceiverConfig,
    "spool": SpoolConfig,
    "broker": BrokerConfig,
    "eligibility": EligibilityConfig,
    "model": ModelConfig,
    "outputs": OutputConfig,
    "retry": RetryConfig,
    "web": WebConfig,
    "dicomweb": DicomwebIngestConfig,
    "pull": PullConfig,
    "backfill": BackfillConfig,
    "instances": InstancesConfig,
    "monitoring": MonitoringConfig,
}


def from_dict(data: dict[str, Any]) -> Config:
    """Build a Config from a parsed TOML document (unknown keys are errors, not silently ignored)."""
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in _SECTIONS:
            kwargs[key] = _build(_SECTIONS[key], value)
        elif key == "destinations":
            kwargs[key] = tuple(_build(Destination, d) for d in value)
        elif key in ("audit_log", "log_level", "audit_max_bytes", "audit_keep", "audit_fsync"):
            kwargs[key] = value
        else:
            raise ValueError(f"unknown configuration section {key!r}")
    return Config(**kwargs)


def _coerce(value: str, current: Any) -> Any:
    if isinstance(current, bool):
        return value.lower() in ("1", "true", "yes", "on")
    if isinstance(current, int):
        return int(value)
    if isinstance(current, float):
        return float(value)
    return value


def load(path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> Config:
    """Read the TOML file (``TRIAGE_CONFIG`` when ``path`` is None; defaults when neither) and apply env overrides."""
    env = dict(os.environ) if env is None else env
    path = path or env.get("TRIAGE_CONFIG")
    cfg = from_dict(tomllib.loads(Path(path).read_text())) if path else Config()
    changes: dict[str, dict[str, Any]] = {}  # per section, applied together (url and token check each other)
    for var, (section, key) in ENV_OVERRIDES.items():
        if var in env and env[var] != "":
            current = getattr(getattr(cfg, section), key) if section else getattr(cfg, key)
            changes.setdefault(section, {})[key] = _coerce(env[var], current)
    for section, values in changes.items():
        cfg = replace(cfg, **values) if not section else replace(cfg, **{section: replace(getattr(cfg, section),
                                                                                          **values)})
    return cfg
