"""The spool's pool of pre-created tmp files (``PrecreatedFiles``): what a write takes from it, what a restart
sweeps, and that a forked child (Celery prefork) gets its own pool."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from triage_node.spool import PrecreatedFiles, Spool, atomic_write

SOP = "1.2.826.0.1.3680043.8.498.1"


def _wait_full(pool: PrecreatedFiles, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while pool._ready.qsize() < pool.depth and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool._ready.qsize() == pool.depth, "the fill thread did not create the pool's files"


def test_store_takes_a_precreated_file_and_the_pool_refills(tmp_path):
    spool = Spool(tmp_path / "spool", tmp_path / "dead")
    pool = spool.precreated()
    _wait_full(pool)
    before = set(os.listdir(pool.dir))
    assert len(before) == pool.depth and all(os.path.getsize(pool.dir / n) == 0 for n in before)
    path, pending = spool.store(SOP, b"DICM" * 1000)
    assert not pending and path.read_bytes() == b"DICM" * 1000
    assert (path.stat().st_mode & 0o777) == 0o600
    after = set(os.listdir(pool.dir))
    assert len(before - after) == 1, "the write used one of the pre-created files (renamed away)"
    _wait_full(pool)  # and the thread made another
    assert len(set(os.listdir(pool.dir)) - before) == 1
    assert not list(spool.instances.glob(".tmp-*")), "no tmp file was created beside the instances"
    spool.close()
    assert not pool.dir.exists()


def test_mode_is_applied_to_a_precreated_file(tmp_path):
    spool = Spool(tmp_path / "spool", tmp_path / "dead")
    _wait_full(spool.precreated())
    spool.begin(SOP, "analyze")  # attempts files are 0640
    assert ((spool.attempts_dir / f"{SOP}.json").stat().st_mode & 0o777) == 0o640
    assert spool.attempts(SOP) == {"open": {"analyze": 1}}
    spool.close()


def test_empty_pool_falls_back_to_creating_a_file(tmp_path):
    pool = PrecreatedFiles(tmp_path / "tmp", depth=1)
    _wait_full(pool)
    pool._stop.set()  # no refill from here on
    pool._wanted.set()
    pool._thread.join(2)
    target = tmp_path / "out" / "a.bin"
    atomic_write(target, b"first", files=pool)
    atomic_write(target, b"second", files=pool)  # the pool is empty now: a file is made in place, as before
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["a.bin"]


def test_a_pool_left_by_a_dead_process_is_swept_and_a_live_ones_kept(tmp_path):
    root = tmp_path / "tmp"
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (root / f"{host}-{dead}").mkdir(parents=True)
    (root / f"{host}-{dead}" / "00000001").write_bytes(b"")
    live = root / f"{host}-{os.getppid()}"
    live.mkdir()
    other_host = root / "another-host-12345"
    other_host.mkdir()
    prefixed = root / f"{host}-west-{dead}"  # a host whose name starts with ours: not ours either
    prefixed.mkdir()
    pool = PrecreatedFiles(root, depth=2)
    try:
        assert not (root / f"{host}-{dead}").exists(), "a dead process's pool is removed"
        assert live.exists() and other_host.exists(), "a live process's and another host's pools are left alone"
        assert prefixed.exists(), "another host whose name begins with this one's"
    finally:
        pool.close()


def test_forked_child_gets_its_own_pool(tmp_path):
    spool = Spool(tmp_path / "spool", tmp_path / "dead")
    parent_pool = spool.precreated()
    _wait_full(parent_pool)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the parent's fill thread did not survive the fork
        try:
            pool = spool.precreated()
            spool.store(SOP, b"from the child")
            ok = pool is not parent_pool and pool.dir.name.endswith(f"-{os.getpid()}")
            os.write(w, b"ok" if ok and (spool.instances / f"{SOP}.dcm").read_bytes() == b"from the child" else b"no")
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    assert os.read(r, 2) == b"ok"
    assert parent_pool._ready.qsize() == parent_pool.depth, "the child took nothing from the parent's pool"
    spool.close()
