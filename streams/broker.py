"""Which local broker to run, and running it.

Two engines speak the Kafka protocol on loopback: Apache Kafka (streams/kafka_broker.py: durable,
the broker the project is proven on, needs Java) and Tansu (streams/tansu_broker.py: memory only,
pip-installed, for machines without Java). `auto` picks Kafka wherever a Java runtime is present.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from enum import StrEnum
from pathlib import Path

from stylestream.streams.broker_process import BrokerError, LocalBroker
from stylestream.streams.kafka_broker import KAFKA_VERSION, jars_at_hand, java_binary, start_kafka
from stylestream.streams.tansu_broker import start_tansu

__all__ = [
    "BrokerError",
    "Engine",
    "LocalBroker",
    "add_broker_option",
    "choose_engine",
    "kill_and_restart",
    "start_local_broker",
]


class Engine(StrEnum):
    auto = "auto"
    kafka = "kafka"
    tansu = "tansu"


def add_broker_option(parser: argparse.ArgumentParser) -> None:
    """`--broker kafka|tansu|auto` for the benchmark scripts."""
    parser.add_argument("--broker", choices=[e.value for e in Engine], default=Engine.auto.value,
                        help="local broker: kafka, tansu, or auto (kafka where Java is present)")


def choose_engine(requested: Engine | str = Engine.auto) -> tuple[Engine, str]:
    """The engine to start for `requested`, and why (for the user to read)."""
    requested = Engine(requested)
    if requested != Engine.auto:
        return requested, "asked for"
    if java_binary() is None:
        return Engine.tansu, "no Java runtime on PATH"
    if not jars_at_hand():
        return Engine.tansu, "Kafka's jars are not cached and there is no Maven to fetch them"
    return Engine.kafka, "a Java runtime is present"


def start_local_broker(engine: Engine | str = Engine.auto, data_dir: Path | None = None,
                       port: int | None = None) -> LocalBroker:
    """Start a broker on loopback (use it in a `with` to stop it). Kafka keeps its log under
    `data_dir` (a restart on the same folder keeps everything); without one it gets a scratch folder,
    removed when the broker stops."""
    engine, _ = choose_engine(engine)
    if engine == Engine.tansu:
        return start_tansu(port)
    if data_dir is not None:
        return start_kafka(data_dir, port)
    scratch = Path(tempfile.mkdtemp(prefix="stylestream-kafka-"))
    try:
        broker = start_kafka(scratch, port)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    broker.remove_data_on_stop = True
    broker.description = f"Apache Kafka {KAFKA_VERSION} (data in {scratch}, removed when it stops)"
    return broker


def kill_and_restart(broker: LocalBroker, down_s: float = 0.0) -> LocalBroker:
    """SIGKILL `broker`, leave it down `down_s`, and start it again on the same port and data folder
    (for fault tests: only Kafka comes back with its data)."""
    broker.process.kill()
    broker.process.wait()
    time.sleep(down_s)
    again = start_local_broker(broker.engine, broker.data_dir, broker.port)
    # the new handle owns the folder now: stopping the old one must not remove it
    again.remove_data_on_stop, broker.remove_data_on_stop = broker.remove_data_on_stop, False
    again.description = broker.description
    return again
