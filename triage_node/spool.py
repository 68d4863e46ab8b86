"""Durable spool: validated UIDs become file names, writes are atomic (tmp + fsync + rename).

Layout under the spool directory::

    instances/<SOPInstanceUID>.dcm   received, waiting for or under processing
    outbox/<SOPInstanceUID>/         results built, waiting to be sent (survives send retries)
    attempts/<SOPInstanceUID>.json   per stage: tasks started and not finished, failures, last reason (poison rule)
    fetched/<SOPInstanceUID>.dcm     a worker host's copy of an instance fetched from the receiver's instance server
                                     (no shared filesystem); never reconciled, removed when the task is done
    tmp/<host>-<pid>/                empty files created ahead of need by each process (``PrecreatedFiles``); a
                                     write fills one and renames it into place (same filesystem: rename is atomic)

Dead letters live in their own folder: ``<dead_letter_dir>/<SOPInstanceUID>/`` with the result files and a
``reason.json``.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import SpoolError

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger(__name__)

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def valid_uid(uid: str) -> bool:
    """True for a syntactically valid DICOM UID (digits and dots, <= 64 chars, no leading zeros)."""
    return isinstance(uid, str) and 0 < len(uid) <= 64 and bool(_UID_RE.match(uid))


def check_uid(uid: str) -> str:
    if not valid_uid(uid):
        raise SpoolError("invalid UID (not usable as a file name)")
    return uid


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | memoryview, mode: int = 0o600, durable: bool = True,
                 files: PrecreatedFiles | None = None) -> None:
    """Write ``data`` to ``path`` so a reader sees either nothing or the whole file, and (``durable``) it survives a
    crash. ``durable=False`` skips the two fsyncs, for state whose loss only repeats idempotent work.

    ``files``: take the temporary file from this pool of empty files created ahead (on the same filesystem as
    ``path``) instead of creating one here: creating a file right after an fsync waits for the journal (0.3-0.9 ms
    per file on this ext4, more than the write and its fsync together)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    taken = files.take() if files is not None else None
    fd, tmp = taken if taken is not None else tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        try:
            if mode != 0o600:  # both kinds of tmp file are made 0600; a needless chmod also waits for the journal
                os.fchmod(fd, mode)
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class PrecreatedFiles:
    """Empty, open temporary files created ahead of need by a background thread, for ``atomic_write``.

    The receiver spools each instance with a tmp file + fsync + rename + directory fsync. On ext4 the *creation*
    of the next tmp file then waits for the journal commit the fsyncs started, and that wait was the largest single
    item on the C-STORE path (``bench/ingest.py``). Here a thread creates the files while the association thread
    is busy elsewhere (it wakes when one is taken); ``take`` never blocks and returns None when the pool is empty
    (the caller then creates a file itself, as before). Durability is unchanged: the writer fsyncs the file and,
    after the rename, the directory it landed in.

    One pool per process, in ``<root>/<host>-<pid>/``; a directory left by a process that is gone is removed when
    the next pool starts on that host (its files are empty: nothing is lost)."""

    def __init__(self, root: Path, depth: int = 8) -> None:
        self.root = root
        self.dir = root / f"{socket.gethostname()}-{os.getpid()}"
        self.depth = depth
        self._ready: queue.Queue[tuple[int, str]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._wanted = threading.Event()
        self._sweep()
        shutil.rmtree(self.dir, ignore_errors=True)  # same host and pid: an earlier life of this process
        self.dir.mkdir(parents=True, mode=0o700)
        self._n = 0
        self._thread = threading.Thread(target=self._fill, name="spool-precreate", daemon=True)
        self._thread.start()

    def _sweep(self) -> None:
        """Remove pools of this host's processes that are gone. Exactly ``<this host>-<pid>``: with a spool shared
        by several hosts, another host's pools (and its PIDs, which mean nothing here) are left alone."""
        mine = re.compile(rf"^{re.escape(socket.gethostname())}-(\d+)$")
        for d in self.root.iterdir() if self.root.is_dir() else []:
            m = mine.match(d.name)
            if not m:
                continue
            try:
                os.kill(int(m[1]), 0)
            except ProcessLookupError:
                shutil.rmtree(d, ignore_errors=True)
            except PermissionError:
                pass  # alive, another user's

    def _create(self) -> tuple[int, str]:
        self._n += 1
        name = str(self.dir / f"{self._n:08d}")
        return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), name

    def _fill(self) -> None:
        while not self._stop.is_set():
            self._wanted.clear()
            try:
                while self._ready.qsize() < self.depth and not self._stop.is_set():
                    self._ready.put(self._create())
            except OSError as exc:  # e.g. a full disk: writers fall back to creating their own (and report it)
                log.warning("pre-creating spool files failed: %s", exc.strerror or exc)
                self._stop.wait(1.0)
                continue
            self._wanted.wait(5.0)

    def take(self) -> tuple[int, str] | None:
        try:
            item = self._ready.get_nowait()
        except queue.Empty:
            item = None
        self._wanted.set()
        return item

    def close(self) -> None:
        self._stop.set()
        self._wanted.set()
        self._thread.join(timeout=2)
        while (item := self.take()) is not None:
            os.close(item[0])
        shutil.rmtree(self.dir, ignore_errors=True)


_POOL_LOCK = threading.Lock()


def _new_pool_lock() -> None:
    global _POOL_LOCK
    _POOL_LOCK = threading.Lock()  # a child forked while another thread held it must not inherit it held


os.register_at_fork(after_in_child=_new_pool_lock)


def _used_fraction(st: Any) -> float:
    """used / (used + available) of a ``shutil.disk_usage`` result."""
    return float(st.used / max(st.used + st.free, 1))


class Spool:
    """The node's on-disk state between receipt and delivery."""

    def __init__(self, directory: str | os.PathLike, dead_letter_dir: str | os.PathLike,
                 max_disk_usage: float = 1.0, reserve_bytes: int = 0) -> None:
        """``max_disk_usage`` and ``reserve_bytes`` are the intake guard (``store`` refuses past either); the
        defaults guard nothing: a node takes them from its configuration (``from_config``)."""
        self.root = Path(directory)
        self.instances = self.root / "instances"
        self.outbox = self.root / "outbox"
        self.attempts_dir = self.root / "attempts"
        self.fetched = self.root / "fetched"
        self.dead = Path(dead_letter_dir)
        self.tmp = self.root / "tmp"
        self.max_disk_usage = max_disk_usage
        self.reserve_bytes = reserve_bytes
        for d in (self.instances, self.outbox, self.attempts_dir, self.fetched, self.tmp, self.dead):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        self._pool: PrecreatedFiles | None = None
        self._pool_pid = 0

    @classmethod
    def from_config(cls, cfg: Config) -> Spool:
        """The node's spool, with the intake guard of ``[spool]``."""
        return cls(cfg.spool.directory, cfg.retry.dead_letter_dir, cfg.spool.max_disk_usage,
                   cfg.spool.reserve_mb * 2**20)

    def precreated(self) -> PrecreatedFiles:
        """This process's pool of tmp files (started on first use, and again in a forked child: Celery's prefork
        workers fork after the spool is built, and a thread does not survive a fork)."""
        if self._pool is None or self._pool_pid != os.getpid():
            with _POOL_LOCK:
                if self._pool is None or self._pool_pid != os.getpid():
                    self._pool, self._pool_pid = PrecreatedFiles(self.tmp), os.getpid()
        return self._pool

    def write(self, path: Path, data: bytes | memoryview, mode: int = 0o600, durable: bool = True) -> None:
        """``atomic_write`` of a file under the spool root, with a pre-created tmp file."""
        atomic_write(path, data, mode=mode, durable=durable, files=self.precreated())

    def close(self) -> None:
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.close()
            self._pool = None

    # -- receiving ---------------------------------------------------------------------------------------------
    def instance_path(self, sop_instance_uid: str) -> Path:
        return self.instances / f"{check_uid(sop_instance_uid)}.dcm"

    def fetched_path(self, sop_instance_uid: str) -> Path:
        """Where a worker host keeps the copy it fetched from the receiver (a cache: the receiver holds the
        instance until the worker tells it the instance is finished)."""
        return self.fetched / f"{check_uid(sop_instance_uid)}.dcm"

    def local_copy(self, sop_instance_uid: str) -> Path | None:
        """The instance as this host holds it: spooled here, or fetched here; None when neither."""
        for p in (self.instance_path(sop_instance_uid), self.fetched_path(sop_instance_uid)):
            if p.exists():
                return p
        return None

    def sweep_fetched(self, older_than_s: float) -> int:
        """Remove fetched copies older than ``older_than_s`` (left by a task that was redelivered to another host);
        a task still needing one fetches it again. Returns how many were removed."""
        now, n = time.time(), 0
        for p in self.fetched.glob("*"):
            try:
                if now - p.stat().st_mtime >= older_than_s:
                    p.unlink()
                    n += 1
            except FileNotFoundError:
                continue
        return n

    def disk_usage(self) -> float:
        """Fraction in use as ``df`` reports it: used / (used + available to us); blocks reserved for root or held
        back by the filesystem count neither way."""
        return _used_fraction(shutil.disk_usage(self.root))

    def free_bytes(self) -> int:
        """Bytes of the spool filesystem still available to the node."""
        return shutil.disk_usage(self.root).free

    def refusal(self) -> str | None:
        """Why new instances would be refused now (the intake guard), or None when there is room.

        Two limits, either refuses: the used fraction (``max_disk_usage``: leaves the rest of a shared disk to
        its other users) and the free space (``reserve_bytes``: headroom for the work already acknowledged,
        whose outputs are still to be written). On a large disk shared with others the fraction alone says
        little: 80 % used can still leave tens of GiB free."""
        st = shutil.disk_usage(self.root)
        usage = _used_fraction(st)
        if usage >= self.max_disk_usage:
            return f"spool disk usage {usage:.0%}, at or above the {self.max_disk_usage:.0%} watermark"
        if st.free < self.reserve_bytes:
            return (f"spool free space {st.free / 2**20:.0f} MiB, below the {self.reserve_bytes / 2**20:.0f} MiB "
                    "reserve")
        return None

    def has_room(self) -> bool:
        return self.refusal() is None

    def store(self, sop_instance_uid: str, data: bytes | memoryview) -> tuple[Path, bool]:
        """Atomically store the encoded instance. Returns (path, already_pending)."""
        path = self.instance_path(sop_instance_uid)
        why = self.refusal()
        if why is not None:
            raise SpoolError(why)
        pending = path.exists()
        try:
            self.write(path, data)
        except OSError as exc:
            raise SpoolError(f"spool write failed: {exc.strerror or exc}") from exc
        return path, pending

    def pending(self, older_than_s: float = 0.0) -> list[Path]:
        """Instances on disk not yet finished (for reconciliation after a restart, and the periodic sweep).

        Workers finish instances while this scans: a file gone between listing and ``stat`` is finished, not an
        error (under load the sweep used to fail on exactly that, every time)."""
        now = time.time()
        found = []
        for p in self.instances.glob("*.dcm"):
            try:
                age = now - p.stat().st_mtime
            except FileNotFoundError:
                continue
            if age >= older_than_s:
                found.append(p)
        return sorted(found)

    def discard(self, sop_instance_uid: str) -> None:
        """Processing of this instance is complete (sent, skipped or dead-lettered)."""
        self.instance_path(sop_instance_uid).unlink(missing_ok=True)
        self.fetched_path(sop_instance_uid).unlink(missing_ok=True)
        shutil.rmtree(self.outbox / sop_instance_uid, ignore_errors=True)
        (self.attempts_dir / f"{sop_instance_uid}.json").unlink(missing_ok=True)

    # -- attempts (the poison-instance rule) ---------------------------------------------------------------------
    def attempts(self, sop_instance_uid: str) -> dict[str, Any]:
        """``{"open": {stage: n}, "failures": n, "last": {"stage", "reason", "ts"}}``; empty for a fresh instance.

        ``open`` counts tasks of a stage started and never finished (a worker killed mid-task: a crash loop),
        ``failures`` the exceptions recorded. Kept on disk so a redelivery or a reconcile does not reset them."""
        path = self.attempts_dir / f"{check_uid(sop_instance_uid)}.json"
        try:
            info = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def _save_attempts(self, sop_instance_uid: str, info: dict[str, Any]) -> None:
        """Best effort: a full or failing spool disk must not turn the bookkeeping of a failure into one more."""
        try:
            self.write(self.attempts_dir / f"{check_uid(sop_instance_uid)}.json", json.dumps(info).encode(),
                       mode=0o640)
        except OSError as exc:
            log.warning("attempt count of %s not saved (%s)", sop_instance_uid, exc.strerror or type(exc).__name__)

    def begin(self, sop_instance_uid: str, stage: str) -> int:
        """A task of ``stage`` starts on the instance; returns how many started in a row without finishing."""
        info = self.attempts(sop_instance_uid)
        info.setdefault("open", {})[stage] = int(info.get("open", {}).get(stage, 0)) + 1
        self._save_attempts(sop_instance_uid, info)
        return int(info["open"][stage])

    def end(self, sop_instance_uid: str, stage: str) -> None:
        """The task of ``stage`` finished (whatever the outcome): it did not crash."""
        info = self.attempts(sop_instance_uid)
        if info.get("open", {}).get(stage) and self.local_copy(sop_instance_uid) is not None:
            info["open"][stage] = 0
            self._save_attempts(sop_instance_uid, info)

    def fail(self, sop_instance_uid: str, stage: str, reason: str) -> int:
        """Record one failure of the instance; returns the failures so far (all stages)."""
        info = self.attempts(sop_instance_uid)
        info["failures"] = int(info.get("failures", 0)) + 1
        info["last"] = {"stage": stage, "reason": reason, "ts": time.time()}
        self._save_attempts(sop_instance_uid, info)
        return int(info["failures"])

    def poison(self, sop_instance_uid: str, limit: int) -> str | None:
        """Why the instance must not be tried again (``limit`` crashes in a row or failures), or None."""
        info = self.attempts(sop_instance_uid)
        crashed = {stage: n for stage, n in info.get("open", {}).items() if int(n) >= limit}
        if crashed:
            stage, n = min(crashed.items())
            return f"poison instance: {stage} started {n} times without finishing (worker lost each time)"
        if int(info.get("failures", 0)) >= limit:
            last = info.get("last", {})
            return (f"poison instance: failed {info['failures']} times, last in {last.get('stage')}: "
                    f"{last.get('reason')}")
        return None

    # -- outbox / dead letters -----------------------------------------------------------------------------------
    def outbox_dir(self, sop_instance_uid: str) -> Path:
        return self.outbox / check_uid(sop_instance_uid)

    def dead_letter(self, sop_instance_uid: str, reason: str, files: list[Path] | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
        """Move what could not be delivered (or processed) into the dead-letter folder with its reason."""
        target = self.dead / check_uid(sop_instance_uid)
        target.mkdir(parents=True, exist_ok=True)
        for f in files or []:
            if f.exists():
                shutil.copy2(f, target / f.name)
        src = self.local_copy(sop_instance_uid)
        if src is not None:
            shutil.copy2(src, target / "source.dcm")
        info = {"sop_instance_uid": sop_instance_uid, "reason": reason, "ts": time.time(), **(extra or {})}
        tries = self.attempts(sop_instance_uid)
        if tries:
            info.setdefault("history", tries)
        atomic_write(target / "reason.json", json.dumps(info, indent=2).encode(), mode=0o640)
        self.discard(sop_instance_uid)
        return target

    def dead_letters(self) -> list[dict[str, Any]]:
        out = []
        for d in sorted(self.dead.iterdir()):
            r = d / "reason.json"
            if r.exists():
                info = json.loads(r.read_text())
                info["path"] = str(d)
                out.append(info)
        return out
