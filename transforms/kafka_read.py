"""Reading a fixed set of Kafka offset ranges as a bounded Beam source.

Beam's own ReadFromKafka is a cross-language (Java) transform that needs an expansion service; this
pure-Python read of planned offset ranges is what lets the local driver run micro-batches whose
exact ranges are committed together with the state they produced.
"""

from __future__ import annotations

from dataclasses import dataclass

import apache_beam as beam
from kafka import TopicPartition

from stylestream.streams import clients


@dataclass(frozen=True)
class OffsetRange:
    topic: str
    partition: int
    start: int  # first offset to read
    stop: int  # one past the last offset to read

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


class _ReadRange(beam.DoFn):
    def __init__(self, bootstrap_servers: str):
        self._bootstrap = bootstrap_servers
        self._consumer = None

    def setup(self):
        self._consumer = clients.consumer(self._bootstrap, fetch_max_wait_ms=clients.READ_FETCH_WAIT_MS)

    def process(self, r: OffsetRange):
        tp = TopicPartition(r.topic, r.partition)
        yield from clients.read_range(self._consumer, tp, r.start, r.stop)

    def teardown(self):
        if self._consumer is not None:
            self._consumer.close()


class ReadOffsetRanges(beam.PTransform):
    """OffsetRanges -> every message in them, once each (`streams.clients.Message`)."""

    def __init__(self, bootstrap_servers: str):
        super().__init__()
        self._bootstrap = bootstrap_servers

    def expand(self, ranges):
        return ranges | "Read" >> beam.ParDo(_ReadRange(self._bootstrap))
