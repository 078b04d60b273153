"""Prometheus metrics of the API (GET /metrics): what its follower meets while it folds the topics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.follower_retries = Counter("stylestream_api_follower_retries",
                                        "Failures of the follower's folding, retried, by error (each is also logged)",
                                        ["error"], registry=self.registry)
        self.follower_failing = Gauge("stylestream_api_follower_failing",
                                      "1 while the follower cannot fold the topics (the answers go stale)",
                                      registry=self.registry)
