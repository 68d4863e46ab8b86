"""Local helper processes for ``triage-node up``: a private redis-server and the Celery workers."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float = 15.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


class PrivateRedis:
    """A redis-server on a free loopback port, append-only file under ``data_dir`` (queue survives restarts)."""

    def __init__(self, data_dir: str | Path, port: int | None = None, persist: bool = True) -> None:
        self.dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.persist = persist
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        exe = shutil.which("redis-server")
        if not exe:
            raise RuntimeError("redis-server not found: install the Debian package redis-server (make setup)")
        self.dir.mkdir(parents=True, exist_ok=True)
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
                "--appendonly", "yes" if self.persist else "no", "--protected-mode", "yes",
                "--logfile", str(self.dir / "redis.log")]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_port("127.0.0.1", self.port):
            self.stop()
            raise RuntimeError(f"private redis-server did not start (see {self.dir / 'redis.log'})")
        log.info("private redis-server on 127.0.0.1:%d (data in %s)", self.port, self.dir)
        (self.dir / "url").write_text(self.url)  # for `triage-node backfill` beside `triage-node up`
        return self

    def stop(self) -> None:
        (self.dir / "url").unlink(missing_ok=True)
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


def worker_command(queue: str, concurrency: int, pool: str, loglevel: str = "INFO", name: str = "") -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", queue, "-n", f"{name or queue}@%h",
            f"--pool={pool}", f"--concurrency={concurrency}", f"--loglevel={loglevel}", "--without-gossip",
            "--without-mingle"]


def start_workers(env: dict[str, str], loglevel: str = "INFO", log_dir: Path | None = None,
                  batch_size: int = 1, processes: int = 1, report_processes: int = 1,
                  report_threads: int = 4) -> list[subprocess.Popen]:
    """One inference worker and ``report_processes`` threaded report workers.

    Inference: ``batch_size`` 1 = prefork with ``processes`` children (CUDA is initialised in the child; a killed
    child's task is redelivered at once); > 1 = that many task threads in one process feeding a micro-batcher.
    Report: each process is its own Celery worker (``report@host``, ``report2@host``, ...) with ``report_threads``
    task threads; more than one spreads the result building, which holds the GIL, over more cores.
    """
    infer = ("infer", "infer", max(1, processes), "prefork") if batch_size <= 1 else \
        ("infer", "infer", batch_size, "threads")
    reports = [("report", "report" if i == 0 else f"report{i + 1}", max(1, report_threads), "threads")
               for i in range(max(1, report_processes))]
    procs = []
    for queue, name, conc, pool in (infer, *reports):
        out = open(log_dir / f"worker-{name}.log", "ab") if log_dir else None
        try:
            procs.append(subprocess.Popen(worker_command(queue, conc, pool, loglevel, name), env=env,
                                          stdout=out or None, stderr=subprocess.STDOUT if out else None))
        finally:
            if out:
                out.close()  # the worker has its own copy of the descriptor; a restart must not leak ours
    return procs


def stop_all(procs: list[subprocess.Popen], timeout: float = 20.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def child_env(base: dict[str, str] | None = None, **kv: str) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update({k: v for k, v in kv.items() if v})
    return env


def receiver_command(config_path: str | None, listen_fd: int | None, loglevel: str = "") -> list[str]:
    cmd = [sys.executable, "-m", "triage_node.cli", "serve", "--child"]
    if config_path:
        cmd += ["--config", config_path]
    if listen_fd is not None:
        cmd += ["--listen-fd", str(listen_fd)]
    return cmd


class ReceiverPool:
    """Extra receiver processes on the node's port: children inherit the listening socket (``shared``) or bind
    their own with SO_REUSEPORT (``reuseport``). ``check()`` restarts the ones that died."""

    def __init__(self, count: int, env: dict[str, str], config_path: str | None, sock: socket.socket | None,
                 log_dir: Path | None = None) -> None:
        self.count, self.env, self.config_path, self.sock, self.log_dir = count, env, config_path, sock, log_dir
        self.procs: list[subprocess.Popen] = []

    def _spawn(self) -> subprocess.Popen:
        fd = self.sock.fileno() if self.sock is not None else None
        cmd = receiver_command(self.config_path, fd)
        fds = (fd,) if fd is not None else ()
        if not self.log_dir:
            return subprocess.Popen(cmd, env=self.env, pass_fds=fds)
        with open(self.log_dir / "receivers.log", "ab") as out:
            return subprocess.Popen(cmd, env=self.env, pass_fds=fds, stdout=out, stderr=subprocess.STDOUT)

    def start(self) -> ReceiverPool:
        self.procs = [self._spawn() for _ in range(self.count)]
        return self

    def check(self) -> int:
        """Restart receiver processes that exited; returns how many were restarted."""
        restarted = 0
        for i, p in enumerate(self.procs):
            if p.poll() is not None:
                log.error("receiver process %d exited (code %s); restarting it", p.pid, p.returncode)
                self.procs[i] = self._spawn()
                restarted += 1
        return restarted

    def stop(self) -> None:
        stop_all(self.procs)
        self.procs = []
