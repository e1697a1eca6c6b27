"""What one server's counters say, read at scrape time: Prometheus metrics and the ``GET /stats``
document (the dashboard's source; rates are left to the reader, the difference of two answers)."""

from __future__ import annotations

import time
from typing import Any, Dict, Iterator, Tuple

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .serving import Counted

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5)


class _ServerCollector:
    """Counters the hot paths keep as plain integers, exposed without per-event cost."""

    def __init__(self, server: Counted) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        srv = self.server
        stats = srv.writer.stats
        yield GaugeMetricFamily("wsbroadcast_connections_open",
                                "WebSocket connections open now", value=len(srv.hub))
        yield CounterMetricFamily("wsbroadcast_connections_accepted",
                                  "TCP connections accepted", value=srv.accepted)
        yield CounterMetricFamily("wsbroadcast_websockets_accepted",
                                  "WebSocket upgrades accepted", value=srv.upgraded)
        pending = srv.pending
        yield GaugeMetricFamily("wsbroadcast_connections_pending",
                                "connections accepted and not upgraded (handshakes, HTTP)",
                                value=len(pending) if pending is not None else 0)
        yield CounterMetricFamily("wsbroadcast_connections_turned_away",
                                  "connections answered 503 for want of room (or of a descriptor)",
                                  value=srv.turned_away)
        yield CounterMetricFamily("wsbroadcast_connections_evicted",
                                  "idle pending connections dropped to make room",
                                  value=pending.evicted if pending is not None else 0)
        yield CounterMetricFamily("wsbroadcast_messages_received",
                                  "messages published (WebSocket, HTTP and in-process)",
                                  value=srv.hub.received)
        yield CounterMetricFamily("wsbroadcast_messages_delivered",
                                  "messages queued for delivery to a connection",
                                  value=stats.delivered)
        yield CounterMetricFamily("wsbroadcast_bytes_out", "bytes written to WebSocket connections",
                                  value=stats.bytes_out)
        deflate = srv.writer.compressors
        yield CounterMetricFamily("wsbroadcast_deflate_calls",
                                  "messages compressed (once per delivery format and window, "
                                  "however many receive them)", value=deflate.calls)
        yield CounterMetricFamily("wsbroadcast_deflate_in_bytes",
                                  "payload bytes given to the compressor", value=deflate.bytes_in)
        yield CounterMetricFamily("wsbroadcast_deflate_out_bytes",
                                  "compressed payload bytes it produced", value=deflate.bytes_out)
        yield CounterMetricFamily("wsbroadcast_slow_consumer_closes",
                                  "connections closed as slow consumers", value=stats.slow_consumers)
        codes = CounterMetricFamily("wsbroadcast_close_codes",
                                    "close frames sent, by close code", labels=["code"])
        for code, n in sorted(stats.close_codes.items()):
            codes.add_metric([str(code)], n)
        yield codes
        yield GaugeMetricFamily("wsbroadcast_writer_queue_depth",
                                "items waiting in the writer's channel", value=srv.writer.depth())


class Metrics:
    """The registry of one server and its exposition."""

    def __init__(self, server: Counted) -> None:
        self.server = server
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_ServerCollector(server))  # type: ignore[arg-type]
        self.latency = Histogram("wsbroadcast_publish_to_write_seconds",
                                 "time from publish to the writer's send of its frames",
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)

    def exposition(self) -> Tuple[bytes, str]:
        """The text exposition format and its content type."""
        samples = self.server.writer.stats.latency_samples
        taken = samples[:]
        del samples[:len(taken)]
        observe = self.latency.observe
        for value in taken:
            observe(value)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def stats_document(server: Counted) -> Dict[str, Any]:
    """The JSON document of ``GET /stats`` (PROTOCOL.md section 1, README)."""
    writer = server.writer
    wstats = writer.stats
    hub = server.hub
    reason = server.degraded_reason()  # as /healthz says it
    pending = server.pending
    doc: Dict[str, Any] = {
        "time": round(time.time(), 3),
        "uptime": round(time.monotonic() - server.started_at, 3) if server.started_at else 0.0,
        "status": "ok" if reason is None else "degraded",
        "connections": len(hub),
        "pending_connections": len(pending) if pending is not None else 0,
        "connections_accepted": server.accepted,
        "websockets_accepted": server.upgraded,
        "turned_away": server.turned_away,
        "subscriptions": hub.subscriptions,
        "messages_in": hub.received,
        "messages_out": wstats.delivered,
        "bytes_out": wstats.bytes_out,
        "slow_consumer_closes": wstats.slow_consumers,
        "close_codes": {str(code): n for code, n in sorted(wstats.close_codes.items())},
        "writer": {"state": writer.state, "alive": writer.alive, "queue_depth": writer.depth()},
        "store": server.broker.status(),
        "topics": hub.topic_rates.top(),
    }
    if reason is not None:
        doc["reason"] = reason
    return doc
