"""Apache Kafka on loopback: a single-node KRaft broker (broker and controller in one process) whose
log directory lives in a folder the caller names, so a restart keeps topics, data and committed
offsets (unlike Tansu, streams/tansu_broker.py, which keeps everything in memory).

The jars come from Maven Central through streams/kafka/pom.xml, resolved once by Maven into a cache
outside the repository (`~/.cache/stylestream`, or `$STYLESTREAM_CACHE`); nothing is committed.
Needs `java` (17 or newer) and, for the first start on a machine, `mvn`.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from stylestream.streams.broker_process import (
    BrokerError,
    LocalBroker,
    die_with_parent,
    free_port,
    port_open,
    wait_for_metadata,
)

KAFKA_VERSION = "4.1.1"
POM = Path(__file__).parent / "kafka" / "pom.xml"
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0  # a clean shutdown flushes the log; past this the broker is killed


def cache_dir() -> Path:
    return Path(os.environ.get("STYLESTREAM_CACHE", Path.home() / ".cache" / "stylestream"))


def java_binary() -> str | None:
    return shutil.which("java")


def jars_at_hand() -> bool:
    """Whether Kafka's jars are cached, or Maven is there to fetch them."""
    return (_libs() / ".complete").exists() or shutil.which("mvn") is not None


def _libs() -> Path:
    return cache_dir() / f"kafka-{KAFKA_VERSION}" / "libs"


def kafka_jars() -> Path:
    """The folder of Kafka's jars, resolved with Maven on first use (one process at a time)."""
    libs = _libs()
    if (libs / ".complete").exists():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError("the bundled Kafka broker needs Maven once, to fetch its jars (apt-get install maven)")
    libs.parent.mkdir(parents=True, exist_ok=True)
    with (libs.parent / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be fetching them right now
        if (libs / ".complete").exists():
            return libs
        partial = libs.with_name("libs.partial")
        shutil.rmtree(partial, ignore_errors=True)
        done = subprocess.run(
            [mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies", f"-DoutputDirectory={partial}",
             f"-Dmaven.repo.local={cache_dir() / 'm2'}"], capture_output=True, text=True)
        if done.returncode != 0:
            raise BrokerError(f"Maven could not fetch Kafka {KAFKA_VERSION}:\n{(done.stdout + done.stderr)[-2000:]}")
        shutil.rmtree(libs, ignore_errors=True)
        partial.rename(libs)
        (libs / ".complete").touch()
    return libs


def server_properties(log_dir: Path, port: int, controller_port: int) -> str:
    return "\n".join([
        "process.roles=broker,controller",
        "node.id=1",
        f"controller.quorum.voters=1@127.0.0.1:{controller_port}",
        f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}",
        "controller.listener.names=CONTROLLER",
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name=PLAINTEXT",
        f"log.dirs={log_dir / 'logs'}",
        "num.partitions=4",
        # one node: every internal topic has one replica
        "offsets.topic.replication.factor=1",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "share.coordinator.state.topic.replication.factor=1",
        "share.coordinator.state.topic.min.isr=1",
        "group.initial.rebalance.delay.ms=0",
        "",
    ])


def start_kafka(log_dir: Path, port: int | None = None) -> LocalBroker:
    """Start (or restart, on the same `log_dir`) the broker and wait until it answers metadata."""
    java = java_binary()
    if java is None:
        raise BrokerError("the bundled Kafka broker needs a Java runtime (17 or newer) on PATH")
    classpath = f"{kafka_jars()}/*"
    log_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    props = log_dir / "server.properties"
    props.write_text(server_properties(log_dir, port, free_port(other_than=port)))
    if not (log_dir / "logs" / "meta.properties").exists():  # a new log directory: give it a cluster id
        # "--cluster-id=ID" in one word: an id may start with "-", which would read as an option
        formatted = subprocess.run([java, "-cp", classpath, "kafka.tools.StorageTool", "format",
                                    f"--cluster-id={_cluster_id()}", "-c", str(props)], capture_output=True, text=True)
        if formatted.returncode != 0:
            raise BrokerError(f"cannot format {log_dir}:\n{(formatted.stdout + formatted.stderr)[-2000:]}")
    log = (log_dir / "broker.log").open("a")
    proc = subprocess.Popen([java, "-Xmx512m", "-cp", classpath, f"-Dlog4j.configuration=file:{_log4j(log_dir)}",
                             "kafka.Kafka", str(props)], stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=die_with_parent)
    log.close()
    broker = LocalBroker(proc, port, "kafka", f"Apache Kafka {KAFKA_VERSION} (data in {log_dir}, kept across restarts)",
                         stop_timeout_s=STOP_TIMEOUT_S, data_dir=log_dir)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while not port_open(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (log_dir / "broker.log").read_text()[-3000:]
                raise BrokerError(f"Kafka did not start on port {port} (log: {log_dir / 'broker.log'}):\n{tail}")
            time.sleep(0.1)
        wait_for_metadata(broker.bootstrap_servers)
    except BaseException:  # a failed or interrupted start leaves no broker behind
        broker.stop()
        raise
    return broker


def _cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes in URL-safe base64 without padding."""
    import base64

    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def _log4j(log_dir: Path) -> Path:
    """Kafka's own logs at INFO to its log file (the default configuration would print them)."""
    path = log_dir / "log4j.properties"
    path.write_text("log4j.rootLogger=INFO, stdout\nlog4j.appender.stdout=org.apache.log4j.ConsoleAppender\n"
                    "log4j.appender.stdout.layout=org.apache.log4j.PatternLayout\n"
                    "log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n\n")
    return path
