"""The spool's intake guard: a watermark on the used fraction and a reserve of free space, either refusing.

The refusals by the receiver over a real association are in test_receiver.py
(``test_intake_guard_answers_out_of_resources_then_recovers``); a filesystem really filled is in chaos/test_faults.py.
Here: the configuration, the reasons, and what the operator's views (readiness, status, dashboard) say."""

from __future__ import annotations

import shutil

import pytest

from triage_node import config
from triage_node.errors import SpoolError
from triage_node.spool import Spool
from triage_node.status import summarise
from triage_node.web.probes import Probes
from triage_node.web.state import AuditState


def node_cfg(tmp_path, **spool) -> config.Config:
    return config.Config(spool=config.SpoolConfig(directory=str(tmp_path / "spool"), **spool),
                         retry=config.RetryConfig(dead_letter_dir=str(tmp_path / "dead")),
                         audit_log=str(tmp_path / "audit.jsonl"))


def test_defaults_guard_both_ways_and_bad_values_are_refused(tmp_path):
    d = config.SpoolConfig()
    assert (d.max_disk_usage, d.reserve_mb) == (0.90, 2048)
    spool = Spool.from_config(node_cfg(tmp_path, reserve_mb=3))
    assert spool.reserve_bytes == 3 * 2**20 and spool.max_disk_usage == 0.90
    for bad in ({"max_disk_usage": 1.5}, {"max_disk_usage": -0.1}, {"reserve_mb": -1}):
        with pytest.raises(ValueError, match="spool."):
            config.SpoolConfig(**bad)
    with pytest.raises(ValueError, match="max_disk_usage"):
        config.from_dict({"spool": {"max_disk_usage": 75}})  # a percentage where a fraction is meant


def test_environment_overrides(tmp_path):
    cfg = config.load(env={"TRIAGE_SPOOL_MAX_DISK_USAGE": "0.8", "TRIAGE_SPOOL_RESERVE_MB": "512"})
    assert (cfg.spool.max_disk_usage, cfg.spool.reserve_mb) == (0.8, 512)


def test_reasons_name_the_limit_and_nothing_is_written(tmp_path):
    free_mib = shutil.disk_usage(tmp_path).free // 2**20
    spool = Spool(tmp_path / "spool", tmp_path / "dead")
    assert spool.refusal() is None and spool.has_room(), "a bare Spool guards nothing"

    spool.reserve_bytes = (free_mib + 1024) * 2**20  # more than this disk has free
    why = spool.refusal()
    assert why is not None and why.startswith("spool free space ") and why.endswith(
        f"below the {free_mib + 1024} MiB reserve"), why
    with pytest.raises(SpoolError, match="below the .* MiB reserve"):
        spool.store("1.2.3.4", b"DICM")
    assert spool.pending() == [] and not spool.instance_path("1.2.3.4").exists()

    spool.reserve_bytes, spool.max_disk_usage = 0, 0.0
    with pytest.raises(SpoolError, match=r"spool disk usage \d+%, at or above the 0% watermark"):
        spool.store("1.2.3.4", b"DICM")

    spool.max_disk_usage = 1.0
    path, pending = spool.store("1.2.3.4", b"DICM")
    assert path.read_bytes() == b"DICM" and not pending


def test_operator_views_say_why_intake_is_refused(tmp_path):
    cfg = node_cfg(tmp_path, max_disk_usage=1.0, reserve_mb=2**30)  # a reserve no disk here meets
    spool = Spool.from_config(cfg)
    probes = Probes(cfg, spool, AuditState(cfg.audit_log))
    ok, detail = probes.spool_writable()
    assert not ok and "below the 1073741824 MiB reserve" in detail, detail
    assert "REFUSING NEW INSTANCES: spool free space" in summarise(cfg, spool)

    spool.reserve_bytes = 0
    ok, detail = probes.spool_writable()
    assert ok and "GiB free" in detail, detail
    assert "REFUSING" not in summarise(cfg, spool)
