"""Smoke test of bench/e2e.py: tiny N, real node, real Orthanc; checks the report's fields, never its timings."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

# tests/ is not a package: pytest puts it on sys.path
import pytest
from conftest import require, site_point

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("settings", [[], ["--set", "outputs.sc_for=flagged", "--flagged-share", "0.5"]],
                         ids=["defaults", "sc-for-flagged"])
def test_e2e_bench_reports_every_figure(tmp_path, settings):
    if settings:  # both kinds of film among the samples: a site point between 0.5.0-demo's scores of them
        point = site_point(tmp_path, 0.80)["site_operating_point"]
        settings = [*settings, "--set", f"model.site_operating_point={point}"]
    # sc-for-flagged: the results per instance depend on the film, so the burst and the backfill end by the node's
    # "sent" records instead of the PACS's instance count
    require("Orthanc", "redis-server")
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "e2e.py"), "--n", "2", "--paced", "2", "--rate", "2",
                          "--bare", "2", "--stages", "1", "--backfill", "2", *settings], cwd=ROOT, capture_output=True,
                         text=True, timeout=900, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    report = json.loads(out[out.index("{"):out.rindex("}") + 1])
    assert report["bare"]["cxr_per_s"] > 0 and report["bare"]["n"] == 2
    run = report["current"]
    assert run["sustained"]["complete"] is True and run["sustained"]["n"] == 2
    assert run["sustained"]["results_per_s"] > 0 and "ratio_to_bare" in run["sustained"]
    paced = run["paced"]
    assert paced["n"] == 2 and {"p50", "p90", "p95", "p99", "max"} <= set(paced["latency_s"])
    assert paced["results"] == 0 or paced["latency_s"]["p95"] > 0  # arrival within the wait is a timing matter
    assert {"receiver", "infer_worker", "report_worker", "redis", "node_total"} <= set(run["cpu_ms_per_cxr_by_process"])
    stages = run["cpu_ms_per_cxr_by_stage"]
    assert {"decode", "model", "sr", "overlay_render", "overlay_encode", "gsps_not_configured", "write", "preview",
            "build_total", "send"} <= set(stages)
    assert run["peak_rss_mb"]["infer_worker"] > 0 and run["peak_rss_mb"]["report_worker"] > 0
    assert "non_model_cpu_ms_per_cxr" in run and run["dead_lettered_or_failed"] == 0
    assert run["burst_flagged_share"] in (0.0, 0.5, 1.0)  # a share of the 2 burst instances, not of the others
    if "--flagged-share" in settings:  # the mix's first two films: one negative, one flagged, and the node agrees
        assert report["flagged_share_requested"] == 0.5 and run["burst_flagged_share"] == 0.5
    backfill = run["backfill"]  # both instances came back from Orthanc through QIDO/WADO and were analysed
    assert backfill["exit"] == 0 and backfill["complete"] is True and backfill["n"] == 2
    assert backfill["results_per_s"] > 0 and "ratio_to_sustained" in backfill
    assert any("received 2" in line for line in backfill["summary"]), backfill["summary"]


def test_e2e_bench_waits_for_the_outputs_the_run_configures():
    # the burst is done when the PACS holds every configured output of every instance: with --set outputs.sc=false
    # a fixed "SR + SC" count would wait for objects that never come (the run hung until its 35-minute deadline)
    spec = importlib.util.spec_from_file_location("bench_e2e", ROOT / "bench" / "e2e.py")
    assert spec is not None and spec.loader is not None
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    defaults = {"outputs": {"sr": True, "sc": True, "gsps": False}}
    assert e2e.results_per_instance(defaults) == 2
    assert e2e.results_per_instance(e2e.apply_settings(json.loads(json.dumps(defaults)), ["outputs.sc=false"])) == 1
    assert e2e.results_per_instance(e2e.apply_settings(json.loads(json.dumps(defaults)), ["outputs.gsps=true"])) == 3
    # with an overlay only for flagged films the count depends on the film: the node's "sent" records say when
    flagged = e2e.apply_settings(json.loads(json.dumps(defaults)), ["outputs.sc_for=flagged"])
    assert e2e.results_per_instance(flagged) is None
    assert e2e.results_per_instance(e2e.apply_settings(flagged, ["outputs.sc=false"])) == 1


def _bench():
    spec = importlib.util.spec_from_file_location("bench_e2e_mix", ROOT / "bench" / "e2e.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_e2e_bench_mixes_flagged_and_negative_films_in_the_share_asked():
    e2e = _bench()
    f, n = [Path(f"f{i}") for i in range(3)], [Path(f"n{i}") for i in range(2)]
    cycle = e2e.mix(f, n, 0.4)
    assert len(cycle) == 20 and sum(x in f for x in cycle) == 8
    assert all(sum(x in f for x in cycle[i:i + 5]) == 2 for i in range(0, 20, 5))  # spread evenly, not in a block
    assert {x for x in cycle if x in f} == set(f) and {x for x in cycle if x in n} == set(n)  # each film in turn
    assert e2e.mix(f, n, 0.0) == [n[i % 2] for i in range(20)] and e2e.mix(f, [], 1.0) == [f[i % 3] for i in range(20)]
    with pytest.raises(SystemExit, match="0 negative"):
        e2e.mix(f, [], 0.4)
