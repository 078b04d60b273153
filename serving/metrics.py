"""Prometheus metrics of a serving worker (scraped from `stylestream serve --metrics-port`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)


class ServeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.results = Counter("stylestream_serve_results", "Generation results by outcome", ["outcome"],
                               registry=self.registry)
        self.batch_size = Histogram("stylestream_serve_batch_size", "Requests per diffusion call",
                                    buckets=(1, 2, 4, 8, 16, 32), registry=self.registry)
        self.latency = Histogram("stylestream_serve_latency_seconds",
                                 "From a request's event time to its result", buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.generate = Histogram("stylestream_serve_generate_seconds", "Duration of one diffusion call",
                                  buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("stylestream_serve_queue_depth",
                                 "Requests on the assigned partitions not yet handled (from the broker's "
                                 "high-water marks)", registry=self.registry)

        self.broker_retries = Counter("stylestream_serve_broker_retries",
                                      "Broker errors met and retried, by error (each is also logged)", ["error"],
                                      registry=self.registry)
        self.broker_failing = Gauge("stylestream_serve_broker_failing",
                                    "1 from a broker error until a batch gets through again", registry=self.registry)

    def serve_http(self, port: int) -> None:
        start_http_server(port, addr="127.0.0.1", registry=self.registry)
