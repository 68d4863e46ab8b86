"""Prometheus ``/metrics``: one custom Collector deriving everything at scrape time (audit trail, Redis, spool).

Counters are totals over the retained audit trail, rotated files included (the trail is the node's durable record,
so they survive restarts of the node, count what every process did, and do not drop when the trail rotates; only
pruning a rotated file, ``audit_keep``, removes its lines from a freshly started reader's totals).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily

from . import monitoring
from .probes import Probes
from .state import STAGES, AuditState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class NodeCollector:
    def __init__(self, state: AuditState, probes: Probes, with_workers: bool = True) -> None:
        self.state, self.probes, self.with_workers = state, probes, with_workers

    def describe(self):  # no up-front description: avoids a scrape at registration time
        return []

    def collect(self):
        st = self.state
        st.refresh()
        with st.lock:
            events = dict(st.events)
            reasons = dict(st.reasons)
            send_failures = dict(st.send_failures)
            stage_failures = dict(st.stage_failures)
            hists = {k: (h.buckets(), h.sum) for k, h in st.hist.items()}
            model = dict(st.model)
        c = CounterMetricFamily("triage_instances_received", "Instances accepted and spooled (audit 'received')")
        c.add_metric([], events.get("received", 0))
        yield c
        c = CounterMetricFamily("triage_results_sent", "Results delivered to every destination (audit 'sent')")
        c.add_metric([], events.get("sent", 0))
        yield c
        c = CounterMetricFamily("triage_results_shadow", "Results built and archived but not sent: shadow mode "
                                "(audit 'shadow')")
        c.add_metric([], events.get("shadow", 0))
        yield c
        c = CounterMetricFamily("triage_instances_analysed", "Instances analysed by the model (audit 'analysed')")
        c.add_metric([], events.get("analysed", 0))
        yield c
        for ev, name, doc in (("skipped", "triage_instances_skipped", "Acknowledged but not processed, by reason"),
                              ("refused", "triage_instances_refused", "Refused with a C-STORE error status, by reason"),
                              ("failed", "triage_instances_failed", "Processing failed, by reason"),
                              ("dead_lettered", "triage_results_dead_lettered",
                               "Results moved to the dead-letter folder, by reason")):
            c = CounterMetricFamily(name, doc, labels=["reason"])
            for (e, why), n in sorted(reasons.items()):
                if e == ev:
                    c.add_metric([why], n)
            yield c
        c = CounterMetricFamily("triage_send_failures", "Failed deliveries per destination (event: retry, "
                                "dead_lettered, replay_failed)", labels=["destination", "event"])
        for (dest, ev), n in sorted(send_failures.items()):
            c.add_metric([dest, ev], n)
        yield c
        c = CounterMetricFamily("triage_send_resent", "C-STOREs left without a response within the destination's "
                                "dimse_timeout and resent on a new association (audit 'send_resent')")
        c.add_metric([], events.get("send_resent", 0))
        yield c
        c = CounterMetricFamily("triage_stage_failures", "Failures of any kind, foreseen or not, by stage (analyze, "
                                "build, send, reconcile) and audit event (failed, retry, dead_lettered)",
                                labels=["stage", "event"])
        for (stage, ev), n in sorted(stage_failures.items()):
            c.add_metric([stage, ev], n)
        yield c
        c = CounterMetricFamily("triage_results_replayed", "Dead letters resent successfully (audit 'replayed')")
        c.add_metric([], events.get("replayed", 0))
        yield c
        h = HistogramMetricFamily("triage_stage_duration_seconds",
                                  "Duration per stage: receive (spool+enqueue), analyse (decode+model), sr_delivered "
                                  "(receive -> SR at every destination, SR-first), end_to_end (receive -> every "
                                  "result sent)", labels=["stage"])
        for stage in STAGES:
            buckets, total = hists[stage]
            h.add_metric([stage], buckets, total)
        yield h
        yield from self._broker()
        yield from self._spool()
        yield from monitoring.collect(self.probes.cfg)  # triage_mode, triage_input_drift{statistic}, drift states
        if model.get("model"):
            i = InfoMetricFamily("triage_model", "Model seen in the last 'analysed' audit line")
            i.add_metric([], {"version": model["model"], "hostname": model.get("hostname", "")})
            yield i

    def _broker(self):
        ok, _ = self.probes.broker_ping()
        g = GaugeMetricFamily("triage_broker_up", "1 when the broker answers PING")
        g.add_metric([], 1 if ok else 0)
        yield g
        depths = self.probes.queue_depths() if ok else None
        if depths is not None:
            g = GaugeMetricFamily("triage_queue_depth", "Tasks waiting in each Celery queue (Redis LLEN)",
                                  labels=["queue"])
            for q, n in depths.items():
                if not q.startswith("_"):
                    g.add_metric([q], n)
            yield g
            g = GaugeMetricFamily("triage_tasks_unacked", "Tasks taken by a worker and not yet acknowledged")
            g.add_metric([], depths["_unacked"])
            yield g
        if self.with_workers:
            w = self.probes.workers()
            g = GaugeMetricFamily("triage_workers_online", "Celery workers answering ping, by role",
                                  labels=["role"])
            for role in ("infer", "report"):
                g.add_metric([role], sum(1 for x in w["workers"] if x["role"] == role))
            yield g

    def _spool(self):
        sp = self.probes.spool
        yield GaugeMetricFamily("triage_spool_disk_usage_ratio", "Used fraction of the spool filesystem",
                                value=sp.disk_usage())
        yield GaugeMetricFamily("triage_spool_disk_watermark_ratio", "Usage at or above which instances are refused",
                                value=sp.max_disk_usage)
        yield GaugeMetricFamily("triage_spool_disk_free_bytes", "Bytes of the spool filesystem available to the node",
                                value=sp.free_bytes())
        yield GaugeMetricFamily("triage_spool_disk_reserve_bytes", "Free space below which instances are refused",
                                value=sp.reserve_bytes)
        g = GaugeMetricFamily("triage_spool_bytes", "Bytes held by the node, by area", labels=["area"])
        for area, n in self.probes.spool_bytes().items():
            g.add_metric([area], n)
        yield g
        g = GaugeMetricFamily("triage_spool_pending_instances", "Instances spooled and not yet finished")
        g.add_metric([], len(sp.pending()))
        yield g
        g = GaugeMetricFamily("triage_dead_letters", "Results currently in the dead-letter folder")
        g.add_metric([], len(sp.dead_letters()))
        yield g


def make_registry(state: AuditState, probes: Probes) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(NodeCollector(state, probes))
    return reg


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
