"""Reading Kafka in Beam, in pure Python: a fixed set of offset ranges (bounded), or every
partition without end (unbounded).

Beam's own ReadFromKafka is a cross-language (Java) transform that needs Beam's Java expansion
service. The bounded read of planned offset ranges is what lets the local driver run micro-batches
whose exact ranges are committed together with the state they produced; the unbounded read is the
streaming pipeline's source on runners where the expansion service cannot be had.
"""

from __future__ import annotations

import sys
import uuid
import weakref
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange as BeamOffsetRange
from apache_beam.io.restriction_trackers import OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import WalltimeWatermarkEstimator
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Duration
from kafka import KafkaConsumer, TopicPartition

from stylestream.streams import clients


@dataclass(frozen=True)
class OffsetRange:
    topic: str
    partition: int
    start: int  # first offset to read
    stop: int  # one past the last offset to read

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def plan_ranges(committed: dict[tuple[str, int], int], ends: dict[tuple[str, int], int],
                max_per_partition: int) -> list[OffsetRange]:
    """The next offset range of every partition that has unread messages (the local driver's cycles,
    the history writer's steps)."""
    ranges = []
    for (topic, partition), end in sorted(ends.items()):
        start = committed.get((topic, partition), 0)
        if end > start:
            ranges.append(OffsetRange(topic, partition, start, min(end, start + max_per_partition)))
    return ranges


# Consumers lent to the read step, by token, by a process that runs its pipelines in-process (the
# local driver, a pipeline run per cycle): a new consumer spends ~0.1 s on its first metadata request.
# Weak references: the lender keeps and closes its consumer.
_LENT: weakref.WeakValueDictionary[str, KafkaConsumer] = weakref.WeakValueDictionary()


def lend_consumer(consumer: KafkaConsumer) -> str:
    """A token under which ReadOffsetRanges, run in this process, reads with `consumer`."""
    token = uuid.uuid4().hex
    _LENT[token] = consumer
    return token


class _ReadRange(beam.DoFn):
    def __init__(self, bootstrap_servers: str, lent: str | None):
        self._bootstrap, self._lent = bootstrap_servers, lent
        self._consumer, self._owned = None, False

    def setup(self):
        self._consumer = _LENT.get(self._lent) if self._lent else None
        if self._consumer is None:
            self._consumer = clients.consumer(self._bootstrap, fetch_max_wait_ms=clients.READ_FETCH_WAIT_MS)
            self._owned = True

    def process(self, r: OffsetRange):
        tp = TopicPartition(r.topic, r.partition)
        yield from clients.read_range(self._consumer, tp, r.start, r.stop)

    def teardown(self):
        if self._owned:
            self._consumer.close()


class ReadOffsetRanges(beam.PTransform):
    """OffsetRanges -> every message in them, once each (`streams.clients.Message`). With `lent` (a
    `lend_consumer` token) it reads with that consumer where it runs in the lender's process, else with
    its own."""

    def __init__(self, bootstrap_servers: str, lent: str | None = None):
        super().__init__()
        self._bootstrap, self._lent = bootstrap_servers, lent

    def expand(self, ranges):
        return ranges | "Read" >> beam.ParDo(_ReadRange(self._bootstrap, self._lent))


# --- unbounded: every partition from its start, for a streaming runner ---------------------------------

UNBOUNDED = sys.maxsize  # the end of an unbounded partition's offsets


@dataclass(frozen=True)
class PartitionStart:
    topic: str
    partition: int
    start: int  # the first offset to read


class _CheckpointOnly(OffsetRestrictionTracker):
    """A partition is read in order by one reader: the runner may checkpoint it (split off the rest
    after what was claimed) but not cut it in two (a split at a fraction of the remaining range, which
    Prism asks for where its splits are on, would start a reader at offset 2**62 of an unbounded partition)."""

    def try_split(self, fraction_of_remainder):
        return super().try_split(0) if fraction_of_remainder == 0 else None


class _PartitionOffsets(RestrictionProvider):
    """A partition's offsets from `start` on, without end; each read hands back the rest after what it
    claimed (`defer_remainder`), which the runner checkpoints."""

    def initial_restriction(self, element: PartitionStart) -> BeamOffsetRange:
        return BeamOffsetRange(element.start, UNBOUNDED)

    def create_tracker(self, restriction: BeamOffsetRange) -> OffsetRestrictionTracker:
        return _CheckpointOnly(restriction)

    def restriction_size(self, element: PartitionStart, restriction: BeamOffsetRange) -> int:
        return 1  # unknown backlog; every partition is worth the same


class _ReadPartition(beam.DoFn):
    def __init__(self, bootstrap_servers: str, idle_wait_s: float):
        self._bootstrap, self._idle_wait = bootstrap_servers, idle_wait_s
        self._consumer = None

    def setup(self):
        self._consumer = clients.consumer(self._bootstrap, fetch_max_wait_ms=clients.READ_FETCH_WAIT_MS)

    @beam.DoFn.unbounded_per_element()
    def process(self, element: PartitionStart,
                tracker=beam.DoFn.RestrictionParam(_PartitionOffsets()),  # noqa: B008 (Beam idiom)
                _watermark=beam.DoFn.WatermarkEstimatorParam(WalltimeWatermarkEstimator.default_provider())):  # noqa: B008
        tp = TopicPartition(element.topic, element.partition)
        self._consumer.assign([tp])
        self._consumer.seek(tp, tracker.current_restriction().start)
        records = self._consumer.poll(timeout_ms=clients.POLL_MS).get(tp, [])
        for r in records:
            if not tracker.try_claim(r.offset):
                return
            yield TimestampedValue(clients.Message(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp),
                                   r.timestamp / 1000)
        # Hand back to the runner (it checkpoints what was claimed) and come back for more.
        tracker.defer_remainder(Duration(seconds=0 if records else self._idle_wait))

    def teardown(self):
        if self._consumer is not None:
            self._consumer.close()


def partition_starts(bootstrap_servers: str, topics: list[str]) -> list[PartitionStart]:
    """Every partition of `topics`, from its earliest offset still on the broker."""
    c = clients.consumer(bootstrap_servers)
    try:
        tps = [tp for t in topics for tp in clients.partitions_of(c, t)]
        return [PartitionStart(tp.topic, tp.partition, start) for tp, start in sorted(c.beginning_offsets(tps).items())]
    finally:
        c.close()


class ReadPartitions(beam.PTransform):
    """Every message of `topics`, without end, from the beginning (`streams.clients.Message`): a
    splittable DoFn over each partition, which the runner checkpoints at its claimed offsets. Used
    where Beam's cross-language ReadFromKafka cannot be (its Java expansion service is not available)."""

    def __init__(self, bootstrap_servers: str, topics: list[str], idle_wait_s: float = 0.1):
        super().__init__()
        self._bootstrap, self._topics, self._idle_wait = bootstrap_servers, topics, idle_wait_s

    def expand(self, begin):
        return (begin
                | "Start" >> beam.Impulse()
                | "Partitions" >> beam.FlatMap(lambda _: partition_starts(self._bootstrap, self._topics))
                | "Spread" >> beam.Reshuffle()
                | "Read" >> beam.ParDo(_ReadPartition(self._bootstrap, self._idle_wait)))
