"""Prometheus metrics of the S3T gateway (``GET /metrics``, text format, the ``prometheus-client`` library).

Each gateway has its own registry (several gateways in one process, as in tests, never share series).
What is counted as it happens lives here (deletion latency, deletions by outcome, requests and tokens per
shard and depth); everything the gateway already keeps (served depth, dead shards, health, integrity counters,
requests cut, retraining, replicas) is read from it at scrape time by a collector, so there is one source of
truth and no second bookkeeping to drift.

Labels are bounded: ``shard`` (m values, or ``base``) and ``depth`` (0..L), never an adapter name (names
change with every deletion, so label cardinality would grow without bound) and never a sample or request id.
``/metrics`` therefore needs no token: it shows what the public ``/s3t/state`` shows, as numbers.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DELETION_OUTCOMES = ("applied", "noop", "pending", "rejected", "failed")
# Deletion-to-effect: from 10 ms (idle) to a minute (a replica timing out).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class GatewayMetrics:
    def __init__(self, gateway):
        self.gateway = gateway
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self.deletion_latency = Histogram(
            "s3t_deletion_to_effect_seconds",
            "Deletion request received -> no served adapter depends on its samples (the certificate's figure)",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.deletions = Counter("s3t_deletions", "Deletion requests answered, by outcome "
                                 "(applied, noop: nothing left to delete, pending: journaled but not yet applied, "
                                 "rejected: bad input, nothing changed, failed: before journaling, nothing changed)",
                                 ["outcome"], registry=self.registry)
        for o in DELETION_OUTCOMES:
            self.deletions.labels(o)
        self.requests = Counter("s3t_requests", "Inference requests routed, by shard and served depth "
                                "(shard 'base': the base model)", ["shard", "depth"], registry=self.registry)
        self.tokens = Counter("s3t_generated_tokens", "Tokens relayed to clients, by shard and served depth "
                              "(non-streaming: the usage block; streaming: one per token event)",
                              ["shard", "depth"], registry=self.registry)
        self.registry.register(_StateCollector(gateway))

    # ----- events ---------------------------------------------------------------------------------
    def deletion(self, outcome: str, effect_seconds: float | None = None) -> None:
        self.deletions.labels(outcome).inc()
        if effect_seconds is not None:
            self.deletion_latency.observe(effect_seconds)

    def request(self, shard, depth) -> None:
        self.requests.labels(_label(shard), str(depth)).inc()

    def generated(self, shard, depth, n: int) -> None:
        if n > 0:
            self.tokens.labels(_label(shard), str(depth)).inc(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _label(shard) -> str:
    return "base" if shard is None else str(shard)


class _StateCollector:
    """Reads the gateway's own state at scrape time."""

    def __init__(self, gateway):
        self.gw = gateway

    def describe(self):
        return []  # dynamic: the families are built from the gateway's state at each scrape

    def collect(self):
        gw = self.gw
        with gw._cond:
            routing = dict(gw.routing)
            quarantined = set(gw._quarantined)
            inflight = sum(gw.inflight.values())
        depth = GaugeMetricFamily("s3t_served_depth", "Depth (blocks) of the prefix each shard serves; 0: dead",
                                  labels=["shard"])
        in_service = GaugeMetricFamily("s3t_shard_in_service", "1 if the shard answers requests", labels=["shard"])
        healthy = GaugeMetricFamily("s3t_shard_healthy", "1 if the shard's adapter is in the engine's list with "
                                    "the digest of its file (as of the last integrity check)", labels=["shard"])
        for s in range(gw.run.shards):
            e = routing.get(s)
            h = gw.shard_health.get(s, {})
            depth.add_metric([str(s)], e["depth"] if e else 0)
            in_service.add_metric([str(s)], int(bool(e) and s not in quarantined))
            healthy.add_metric([str(s)], int(bool(e) and s not in quarantined and h.get("healthy", True)))
        yield depth
        yield in_service
        yield healthy
        yield GaugeMetricFamily("s3t_dead_shards", "Shards with no surviving prefix (need retraining)",
                                value=sum(1 for s in range(gw.run.shards) if not routing.get(s)))
        yield GaugeMetricFamily("s3t_inflight_requests", "Requests being relayed now", value=inflight)
        yield CounterMetricFamily("s3t_requests_cut", "Requests cut because a deletion retired their adapter",
                                  value=gw.cut_requests)
        integ = gw.integrity
        yield GaugeMetricFamily("s3t_integrity_checks", "Integrity checks run", value=integ["checks"])
        yield CounterMetricFamily("s3t_digest_mismatches", "Served adapters found missing from the engine or with "
                                  "LoRA tensors that differ from their file", value=integ["mismatches"])
        yield CounterMetricFamily("s3t_integrity_repairs", "Shards reloaded by the integrity check",
                                  value=integ["repairs"])
        yield CounterMetricFamily("s3t_regained_adapters_removed", "Engine adapters the gateway does not serve, "
                                  "found and removed", value=integ["regained_removed"])
        st = gw.retrain_status if isinstance(gw.retrain_status, dict) else {}
        running = bool(gw.retrain_thread and gw.retrain_thread.is_alive())
        rt = GaugeMetricFamily("s3t_retraining", "Background retraining: 1 for the current state", labels=["state"])
        now = "running" if running else ("failed" if st.get("state") == "failed" else "idle")
        for s in ("idle", "running", "failed"):
            rt.add_metric([s], int(s == now))
        yield rt
        yield CounterMetricFamily("s3t_retraining_stages", "Stages trained by background retraining",
                                  value=st.get("stages_trained", 0))
        replicas = gw.replica_states() if hasattr(gw, "replica_states") else []
        up = GaugeMetricFamily("s3t_replica_up", "1 if the vLLM replica receives traffic", labels=["replica"])
        fenced = GaugeMetricFamily("s3t_replica_fenced", "1 if the replica is fenced (no traffic until reconciled "
                                   "to the current routing)", labels=["replica"])
        reqs = CounterMetricFamily("s3t_replica_requests", "Requests relayed to the vLLM replica",
                                   labels=["replica"])
        for r in replicas:
            up.add_metric([str(r["replica"])], int(r["up"]))
            fenced.add_metric([str(r["replica"])], int(r["fenced"]))
            reqs.add_metric([str(r["replica"])], r.get("requests", 0))
        yield up
        yield fenced
        yield reqs
