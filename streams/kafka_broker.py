"""Apache Kafka on loopback: a single-node KRaft broker (broker and controller in one process) whose
log directory lives in a folder the caller names, so a restart keeps topics, data and committed
offsets (unlike Tansu, streams/tansu_broker.py, which keeps everything in memory); or a cluster of
such nodes (`start_kafka_cluster`), each a broker and a voter of the controller quorum, where every
partition has a replica on each node and a write needs two of them (replication 3,
min.insync.replicas 2): one node may die with nothing lost.

The jars come from Maven Central through streams/kafka/pom.xml, resolved once by Maven into a cache
outside the repository (`~/.cache/stylestream`, or `$STYLESTREAM_CACHE`); nothing is committed.
Needs `java` (17 or newer) and, for the first start on a machine, `mvn`.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
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
# A local node serves one machine's demo and tests, where a quick start counts more than peak
# throughput: the quick compiler alone and the serial collector bring a node up in 4.0 s against 5.0.
QUICK_START_JVM = ("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC")


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


def replication(nodes: int) -> tuple[int, int]:
    """(replicas of each partition, replicas a write needs) on a cluster of `nodes`."""
    replicas = min(nodes, 3)
    return replicas, min(replicas, 2)


def server_properties(log_dir: Path, port: int, controller_port: int, node_id: int = 1,
                      voters: dict[int, int] | None = None) -> str:
    """One node's settings; `voters`: each quorum node's id and controller port (default: this node alone).
    With several nodes, every partition is replicated to all (at most three) and a write needs two."""
    voters = voters or {node_id: controller_port}
    replicas, in_sync = replication(len(voters))
    return "\n".join([
        "process.roles=broker,controller",
        f"node.id={node_id}",
        "controller.quorum.voters=" + ",".join(f"{n}@127.0.0.1:{p}" for n, p in sorted(voters.items())),
        f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}",
        "controller.listener.names=CONTROLLER",
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name=PLAINTEXT",
        f"log.dirs={log_dir / 'logs'}",
        "num.partitions=4",
        f"offsets.topic.replication.factor={replicas}",
        f"transaction.state.log.replication.factor={replicas}",
        f"transaction.state.log.min.isr={in_sync}",
        f"share.coordinator.state.topic.replication.factor={replicas}",
        f"share.coordinator.state.topic.min.isr={in_sync}",
        "group.initial.rebalance.delay.ms=0",
        # In a cluster a dead node is noticed in seconds (the default waits 9 s before moving its
        # partitions' leadership). Not on one node: there a busy machine would fence the only broker.
        *([f"default.replication.factor={replicas}", f"min.insync.replicas={in_sync}",
           "broker.session.timeout.ms=4000", "broker.heartbeat.interval.ms=500"] if len(voters) > 1 else []),
        "",
    ])


def _format(java: str, classpath: str, log_dir: Path, props: Path, cluster_id: str) -> None:
    """Give a new log directory its cluster id (a known one keeps its own)."""
    if (log_dir / "logs" / "meta.properties").exists():
        return
    # "--cluster-id=ID" in one word: an id may start with "-", which would read as an option
    formatted = subprocess.run([java, *QUICK_START_JVM, "-cp", classpath, "kafka.tools.StorageTool", "format",
                                f"--cluster-id={cluster_id}", "-c", str(props)], capture_output=True, text=True)
    if formatted.returncode != 0:
        raise BrokerError(f"cannot format {log_dir}:\n{(formatted.stdout + formatted.stderr)[-2000:]}")


def _format_one_node(java: str, classpath: str, log_dir: Path) -> None:
    """Give a new single-node log directory what StorageTool writes (a known one keeps its own).
    StorageTool runs once per Kafka version (a JVM start, about 3 s) into the cache; each new
    directory gets a copy with its own cluster and directory ids."""
    logs = log_dir / "logs"
    if (logs / "meta.properties").exists():
        return
    formatted = cache_dir() / f"kafka-{KAFKA_VERSION}" / "one-node-format"
    if not (formatted / "logs" / "meta.properties").exists():
        formatted.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=formatted.parent))
        props = scratch / "server.properties"
        props.write_text(server_properties(scratch, free_port(), free_port()))  # ports: unused by a format
        _format(java, classpath, scratch, props, _cluster_id())
        try:
            scratch.rename(formatted)  # another process may have put it there first
        except OSError:
            shutil.rmtree(scratch, ignore_errors=True)
    logs.mkdir(parents=True, exist_ok=True)
    shutil.copy(formatted / "logs" / "bootstrap.checkpoint", logs)
    fresh = {"cluster.id": _cluster_id(), "directory.id": _cluster_id()}
    lines = [f"{k}={fresh[k]}" if (k := line.split("=", 1)[0]) in fresh else line
             for line in (formatted / "logs" / "meta.properties").read_text().splitlines()]
    (logs / "meta.properties").write_text("\n".join(lines) + "\n")


def _launch(java: str, classpath: str, log_dir: Path, port: int, description: str) -> LocalBroker:
    """The node whose settings are in `log_dir`/server.properties, started (not yet waited for)."""
    log = (log_dir / "broker.log").open("a")
    proc = subprocess.Popen([java, "-Xmx512m", *QUICK_START_JVM, "-cp", classpath,
                             f"-Dlog4j.configuration=file:{_log4j(log_dir)}",
                             "kafka.Kafka", str(log_dir / "server.properties")], stdout=log,
                            stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    log.close()
    return LocalBroker(proc, port, "kafka", description, stop_timeout_s=STOP_TIMEOUT_S, data_dir=log_dir)


def _wait_until_listening(broker: LocalBroker) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not port_open(broker.port):
        if broker.process.poll() is not None or time.monotonic() > deadline:
            tail = (broker.data_dir / "broker.log").read_text()[-3000:]
            raise BrokerError(f"Kafka did not start on port {broker.port} (log: {broker.data_dir / 'broker.log'}):"
                              f"\n{tail}")
        time.sleep(0.1)


def _runtime() -> tuple[str, str]:
    java = java_binary()
    if java is None:
        raise BrokerError("the bundled Kafka broker needs a Java runtime (17 or newer) on PATH")
    return java, f"{kafka_jars()}/*"


def start_kafka(log_dir: Path, port: int | None = None) -> LocalBroker:
    """Start (or restart, on the same `log_dir`) the broker and wait until it answers metadata."""
    java, classpath = _runtime()
    log_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    props = log_dir / "server.properties"
    props.write_text(server_properties(log_dir, port, free_port(other_than=port)))
    _format_one_node(java, classpath, log_dir)
    broker = _launch(java, classpath, log_dir, port,
                     f"Apache Kafka {KAFKA_VERSION} (data in {log_dir}, kept across restarts)")
    try:
        _wait_until_listening(broker)
        wait_for_metadata(broker.bootstrap_servers)
    except BaseException:  # a failed or interrupted start leaves no broker behind
        broker.stop()
        raise
    return broker


@dataclass
class KafkaCluster:
    """Nodes of one Kafka cluster on loopback (node ids 1..n), each keeping its log under root/node-<id>."""

    nodes: dict[int, LocalBroker]

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(n.bootstrap_servers for n in self.nodes.values())

    @property
    def description(self) -> str:
        root = next(iter(self.nodes.values())).data_dir.parent
        replicas, in_sync = replication(len(self.nodes))
        return (f"Apache Kafka {KAFKA_VERSION}, a cluster of {len(self.nodes)} nodes (replication {replicas}, "
                f"writes need {in_sync}; data in {root})")

    def kill(self, node_id: int) -> None:
        """SIGKILL one node (its data stays)."""
        self.nodes[node_id].process.kill()
        self.nodes[node_id].process.wait()

    def stop(self) -> None:
        # All at once: nodes stopped one by one would leave the last without a quorum to shut down with.
        for node in self.nodes.values():
            if node.process.poll() is None:
                node.process.terminate()
        for node in self.nodes.values():
            node.stop()

    def __enter__(self) -> KafkaCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_kafka_cluster(root: Path, nodes: int = 3) -> KafkaCluster:
    """Start (or restart, on the same `root`) a cluster of `nodes` nodes and wait until it answers
    metadata. Each node is a broker and a controller; its ports are kept in its settings, so a
    restart finds the same addresses."""
    java, classpath = _runtime()
    dirs = {n: root / f"node-{n}" for n in range(1, nodes + 1)}
    known = sorted(root.glob("node-*"))
    if known and sorted(dirs.values()) != known:
        raise BrokerError(f"{root} holds a cluster of {len(known)} nodes, not {nodes}: use another folder")
    if not all((d / "server.properties").exists() for d in dirs.values()):
        ports: list[int] = []
        while len(ports) < 2 * nodes:
            port = free_port()
            ports += [port] if port not in ports else []
        voters = {n: ports[nodes + n - 1] for n in dirs}
        for n, d in dirs.items():
            d.mkdir(parents=True, exist_ok=True)
            (d / "server.properties").write_text(server_properties(d, ports[n - 1], voters[n], n, voters))
    # One id for every node: a node formatted by an earlier, interrupted start gives its own
    formatted = [d / "logs" / "meta.properties" for d in dirs.values() if (d / "logs" / "meta.properties").exists()]
    cluster_id = next((line.split("=", 1)[1] for line in formatted[0].read_text().splitlines()
                       if line.startswith("cluster.id=")), None) if formatted else None
    cluster_id = cluster_id or _cluster_id()
    for d in dirs.values():
        _format(java, classpath, d, d / "server.properties", cluster_id)
    cluster = KafkaCluster({})
    try:
        for n, d in dirs.items():
            port = int(next(line for line in (d / "server.properties").read_text().splitlines()
                            if line.startswith("listeners=")).split(":")[2].split(",")[0])
            cluster.nodes[n] = _launch(java, classpath, d, port, f"node {n} of a Kafka cluster (data in {d})")
        for node in cluster.nodes.values():
            _wait_until_listening(node)
        wait_for_metadata(cluster.bootstrap_servers, timeout_s=START_TIMEOUT_S)
    except BaseException:  # a failed or interrupted start leaves no node behind
        cluster.stop()
        raise
    return cluster


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
