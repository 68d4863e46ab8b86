"""Append-only JSON-lines audit trail: one line per hop, UIDs and reasons only (never patient demographics).

Several processes append to one trail (receiver, workers, ``triage-node replay``). Each line goes out in one
``O_APPEND`` write, so lines never interleave. Lines written at the same time by several threads of a process are
group-committed: one thread writes the whole batch in one ``write`` (and one ``fsync`` when ``fsync`` is on) while
the others wait; ``record`` returns only once its own line is in the file, as before.

Rotation by size: the active file ``audit.jsonl`` is renamed to ``audit.jsonl.<UTC time>`` once it reaches
``max_bytes``, and the oldest rotated files beyond ``keep`` are deleted. Writers hold a shared ``flock`` on
``audit.jsonl.lock`` while they open and write; the rotation renames under the exclusive lock. So no write is in
flight at the rename, the next write creates a fresh active file, and a rotated file never changes again: no line is
lost or written twice, and a reader that finishes a rotated file can move on for good (see :func:`open_segments`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)
#: Keys that may never appear in an audit line, whatever a caller passes.
_FORBIDDEN = {"PatientName", "PatientID", "PatientBirthDate", "patient_name", "patient_id", "birth_date"}
DEFAULT_MAX_BYTES = 64 << 20
DEFAULT_KEEP = 20
_ROTATED = re.compile(r"\.\d{8}T\d{6}\.\d{6}Z$")


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def rotated_files(path: Path) -> list[Path]:
    """Rotated files of the trail at ``path``, oldest first (their names sort by rotation time)."""
    try:
        names = [n for n in os.listdir(path.parent) if n.startswith(path.name + ".") and _ROTATED.search(n)]
    except FileNotFoundError:
        return []
    return [path.parent / n for n in sorted(names)]


@contextmanager
def _flocked(path: Path, mode: int) -> Iterator[None]:
    try:
        fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT, 0o640)
    except OSError:  # a read-only copy of a trail: nobody rotates it
        yield
        return
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)  # releases the lock


class _Writer:
    """Group commit + rotation for one trail in this process (shared by every ``Audit`` on the same path)."""

    def __init__(self, path: Path, max_bytes: int, keep: int, fsync: bool) -> None:
        self.path, self.max_bytes, self.keep, self.fsync = path, max_bytes, keep, fsync
        self._reinit()

    def _reinit(self) -> None:
        """Fresh state (also in a forked child: the parent's lock descriptor must not be shared)."""
        for fd in (getattr(self, "fd", None), getattr(self, "lockfd", None)):
            if fd is not None:
                with suppress(OSError):
                    os.close(fd)
        self.cond = threading.Condition()
        self.queue: list[bytes] = []
        self.seq = self.done = 0
        self.busy = False
        self.fd: int | None = None
        self.lockfd: int | None = None
        self.ino = -1
        self.unchecked = 0

    def commit(self, lines: list[bytes]) -> None:
        """Return once ``lines`` are written (one leader writes what every waiting thread queued, in one go)."""
        with self.cond:
            self.queue.extend(lines)
            self.seq += 1
            mine = self.seq
            while self.done < mine:
                if self.busy:
                    self.cond.wait()
                    continue
                self.busy, batch, upto = True, self.queue, self.seq
                self.queue = []
                self.cond.release()
                try:
                    self._flush(b"".join(batch))
                except OSError as exc:  # the audit trail must never take the node down
                    log.error("audit write failed (%s): %s", self.path, exc)
                finally:
                    self.cond.acquire()
                    self.busy, self.done = False, upto
                    self.cond.notify_all()

    def _flush(self, data: bytes) -> None:
        if self.lockfd is None:
            self.lockfd = os.open(lock_path(self.path), os.O_RDWR | os.O_CREAT, 0o640)
        fcntl.flock(self.lockfd, fcntl.LOCK_SH)
        try:
            try:
                ino = os.stat(self.path).st_ino
            except FileNotFoundError:
                ino = -2
            if self.fd is None or ino != self.ino:  # first write, or the file was rotated by another process
                if self.fd is not None:
                    os.close(self.fd)
                    self.fd = None
                self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                self.ino = os.fstat(self.fd).st_ino
            os.write(self.fd, data)
            if self.fsync:
                os.fdatasync(self.fd)
            # the size is looked at after every 1/16 of max_bytes written here (files end up about max_bytes)
            self.unchecked += len(data)
            size = -1
            if self.max_bytes and self.unchecked >= self.max_bytes // 16:
                size, self.unchecked = os.fstat(self.fd).st_size, 0
        finally:
            fcntl.flock(self.lockfd, fcntl.LOCK_UN)
        if self.max_bytes and size >= self.max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        assert self.lockfd is not None
        fcntl.flock(self.lockfd, fcntl.LOCK_EX)  # waits for every write in flight, in every process
        try:
            try:
                if os.stat(self.path).st_size < self.max_bytes:
                    return  # another writer rotated first
            except FileNotFoundError:
                return
            now = time.time()
            while True:
                stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1e6) % 1000000:06d}Z"
                target = self.path.with_name(f"{self.path.name}.{stamp}")
                if not target.exists():
                    break
                now += 1e-6
            os.rename(self.path, target)
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            old = rotated_files(self.path)
            for p in old[:max(0, len(old) - self.keep)] if self.keep else []:
                p.unlink(missing_ok=True)
            log.info("audit trail rotated to %s", target.name)
        finally:
            fcntl.flock(self.lockfd, fcntl.LOCK_UN)


_writers: dict[tuple[Path, int, int, bool], _Writer] = {}
_writers_lock = threading.Lock()


def _after_fork() -> None:
    global _writers_lock
    _writers_lock = threading.Lock()
    for w in _writers.values():
        w._reinit()


os.register_at_fork(after_in_child=_after_fork)


class Audit:
    """Writes ``{"ts", "event", "pid", ...}`` lines; safe across threads and processes, rotated by size.

    Parameters
    ----------
    path
        The active trail file; ``None`` records nothing.
    max_bytes
        Rotate once the active file reaches this size (0: never).
    keep
        Rotated files kept (0: all).
    fsync
        ``fdatasync`` each committed batch before ``record`` returns (group commit makes it one per batch).
    """

    def __init__(self, path: str | os.PathLike | None, max_bytes: int = DEFAULT_MAX_BYTES, keep: int = DEFAULT_KEEP,
                 fsync: bool = False) -> None:
        self.path = Path(path) if path else None
        self._key = (self.path.resolve(), int(max_bytes), int(keep), bool(fsync)) if self.path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_config(cls, cfg: Any) -> Audit:
        """The trail of a :class:`~triage_node.config.Config` with its rotation settings."""
        return cls(cfg.audit_log, getattr(cfg, "audit_max_bytes", DEFAULT_MAX_BYTES),
                   getattr(cfg, "audit_keep", DEFAULT_KEEP), getattr(cfg, "audit_fsync", False))

    def _writer(self) -> _Writer:
        assert self._key is not None
        w = _writers.get(self._key)
        if w is None:
            with _writers_lock:
                w = _writers.setdefault(self._key, _Writer(*self._key))
        return w

    @staticmethod
    def _line(event: str, fields: dict[str, Any]) -> bytes:
        entry = {"ts": round(time.time(), 3), "event": event, "pid": os.getpid()}
        entry.update({k: v for k, v in fields.items() if k not in _FORBIDDEN})
        return (json.dumps(entry, default=str) + "\n").encode()

    def record(self, event: str, **fields: Any) -> None:
        """Append one line; returns once it is in the file (and on disk with ``fsync``)."""
        if self._key is not None:
            self._writer().commit([self._line(event, fields)])

    def record_many(self, entries: Iterable[tuple[str, dict[str, Any]]]) -> None:
        """Append several lines in one write (adjacent in the trail)."""
        lines = [self._line(ev, f) for ev, f in entries]
        if self._key is not None and lines:
            self._writer().commit(lines)


@dataclass
class Segment:
    """One file of the trail opened for reading: rotated files first (oldest first), the active file last."""

    path: Path
    inode: int
    file: IO[bytes]
    active: bool


def open_segments(path: str | os.PathLike) -> list[Segment]:
    """Open every file of the trail at one instant (no rotation in between). The caller closes them."""
    p = Path(path)
    out: list[Segment] = []
    if not p.parent.exists():
        return out
    with _flocked(p, fcntl.LOCK_SH):
        for f, active in [(r, False) for r in rotated_files(p)] + [(p, True)]:
            try:
                fh = open(f, "rb")
            except FileNotFoundError:  # pruned meanwhile (rotated) or not created yet (active)
                continue
            out.append(Segment(f, os.fstat(fh.fileno()).st_ino, fh, active))
    return out


def _parse(data: bytes) -> Iterator[dict[str, Any]]:
    for line in data.splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue  # a torn line (crash mid-write)
        if isinstance(e, dict):
            yield e


def has_entry(path: str | os.PathLike, event: str, sop_instance_uid: str) -> bool:
    """Whether the trail (rotated files included) holds an ``event`` line for this SOP Instance UID.

    A byte search first, so only the few lines naming the instance are parsed; meant for rare recovery paths."""
    needle = json.dumps(sop_instance_uid).encode()
    segs = open_segments(path)
    try:
        for s in reversed(segs):  # newest first
            data = s.file.read()
            if needle not in data:
                continue
            for e in _parse(b"\n".join(ln for ln in data.splitlines() if needle in ln)):
                if e.get("event") == event and e.get("sop_instance_uid") == sop_instance_uid:
                    return True
    finally:
        for s in segs:
            s.file.close()
    return False


def read(path: str | os.PathLike, since: float | None = None) -> list[dict[str, Any]]:
    """All audit entries across rotated files and the active one, oldest first (torn lines skipped).

    ``since``: skip rotated files last written before this time (their lines are all older)."""
    out: list[dict[str, Any]] = []
    segs = open_segments(path)
    try:
        for s in segs:
            if since is not None and not s.active and os.fstat(s.file.fileno()).st_mtime < since:
                continue
            out.extend(_parse(s.file.read()))
    finally:
        for s in segs:
            s.file.close()
    return out
