"""Every command, given the mistakes people make, answers with a message naming what is wrong and
the right exit status (2: usage, 1: runtime), never a traceback, and an invalid invocation publishes
and writes nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import read_topic

from stylestream.api.system import DemoIssuer
from stylestream.streams.broker_process import free_port
from stylestream.streams.topics import ALL_TOPICS

USAGE, RUNTIME = 2, 1
COMMAND = str(Path(sys.executable).parent / "stylestream")


def stylestream(*args: str, cwd: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stylestream.cli.main", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={**os.environ, "COLUMNS": "200", **(env or {})})


def mistakes(bs: str, unreachable: str, tmp: Path) -> list[tuple[list[str], int, str]]:
    """(arguments, exit status, what the message must name)."""
    a_file = tmp / "a-file"
    photos = tmp / "photos"
    return [
        (["broker", "--port", "70000"], USAGE, "--port"),
        (["broker", "--partitions", "0"], USAGE, "--partitions"),
        (["broker", "--engine", "zookeeper"], USAGE, "--engine"),
        (["broker", "--data-dir", str(a_file)], USAGE, "is a file, not a folder"),
        (["ingest"], USAGE, "--bootstrap-servers"),
        (["ingest", "-b", "localhost"], USAGE, "is not host:port"),
        (["ingest", "-b", "localhost:99999"], USAGE, "is not host:port"),
        (["ingest", "-b", bs, "--half-life-days", "3"], USAGE, "--half-life-days"),
        (["ingest", "-b", bs, "--max-events-per-partition", "0"], USAGE, "--max-events-per-partition"),
        (["ingest", "-b", bs, "--data-dir", str(a_file)], USAGE, "--data-dir"),
        (["ingest", "-b", unreachable, "--until-caught-up"], RUNTIME, f"no Kafka broker answers at {unreachable}"),
        (["ingest", "-b", "no-such-host.invalid:9092"], RUNTIME, "cannot resolve the broker host"),
        (["backfill", str(tmp / "missing"), "-u", "ana", "-b", bs], USAGE, "does not exist"),
        (["backfill", str(photos), "-b", bs], USAGE, "--user"),
        (["backfill", str(photos), "-u", "ana", "-b", unreachable], RUNTIME, "no Kafka broker answers"),
        (["serve", "-b", bs, "--max-batch", "0"], USAGE, "--max-batch"),
        (["serve", "-b", bs, "--max-wait-ms", "-1"], USAGE, "--max-wait-ms"),
        (["serve", "-b", bs, "--metrics-port", "0"], USAGE, "--metrics-port"),
        (["serve", "-b", bs, "--max-requests", "0"], USAGE, "--max-requests"),
        (["serve", "-b", bs, "--idle-exit-s", "-5"], USAGE, "--idle-exit-s"),
        (["serve", "-b", bs, "--max-loras", "0"], USAGE, "--max-loras"),
        (["demo", "--broker", "zookeeper"], USAGE, "--broker"),
        (["train-adapter", str(tmp / "missing"), "-o", str(tmp / "out")], USAGE, "does not exist"),
        (["train-adapter", str(photos), "-o", str(tmp / "out"), "--steps", "0"], USAGE, "--steps"),
        (["train-adapter", str(photos), "-o", str(a_file)], USAGE, "--output"),
        (["drift", "top", "-n", "0"], USAGE, "'-n'"),
        (["drift", "user"], USAGE, "Missing argument 'USER'"),
        (["drift", "top", "--since", "yesterday-ish"], USAGE, "--since"),
        (["api", "-b", bs], USAGE, "--jwt-public-key"),
        (["api", "-b", bs, "--jwt-public-key", str(a_file)], USAGE, "--jwt-public-key"),  # not a key
        (["api", "-b", bs, "--jwt-public-key", str(tmp / "missing")], USAGE, "does not exist"),
        (["api", "-b", bs, "--jwt-public-key", str(tmp / "key.pem"), "--sizes", "64x64,huge"], USAGE, "'huge'"),
        (["api", "-b", bs, "--jwt-public-key", str(tmp / "key.pem"), "--port", "70000"], USAGE, "--port"),
        (["api", "-b", unreachable, "--jwt-public-key", str(tmp / "key.pem")], RUNTIME, "no Kafka broker answers"),
        (["api-token"], USAGE, "Missing argument 'USER_ID'"),
    ]


@pytest.mark.slow
def test_every_mistake_gets_a_clear_message_and_the_right_exit_status(broker, tmp_path):
    bs = broker.bootstrap_servers
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "photos").mkdir()
    (tmp_path / "key.pem").write_bytes(DemoIssuer(tmp_path / "issuer").public_key_pem())
    unreachable = f"127.0.0.1:{free_port()}"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    failures = []
    for args, status, names in mistakes(bs, unreachable, tmp_path):
        t0 = time.monotonic()
        done = stylestream(*args, cwd=cwd)
        out = done.stdout + done.stderr
        seconds = time.monotonic() - t0
        if "Traceback" in out or done.returncode != status or names not in " ".join(out.split()) or seconds > 30:
            failures.append(f"{args}: exit {done.returncode} after {seconds:.0f} s, wanted {status} naming "
                            f"{names!r}:\n{out[-1500:]}")
    assert not failures, "\n\n".join(failures)
    assert list(cwd.iterdir()) == [], "an invalid invocation wrote files"  # not even stylestream-data/
    assert not (tmp_path / "out").exists()
    assert all(read_topic(bs, t) == [] for t in ALL_TOPICS), "an invalid invocation published"


def test_a_busy_port_is_named_before_anything_starts(tmp_path):
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = stylestream("broker", "--port", str(port), "--data-dir", str(tmp_path / "data"), cwd=tmp_path)
    assert done.returncode == USAGE and f"port {port} on 127.0.0.1 is already in use" in done.stdout + done.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.slow
def test_a_runtime_error_is_one_line_and_debug_shows_the_traceback(broker, tmp_path):
    state = tmp_path / "data" / "state"
    state.mkdir(parents=True)
    (state / "state.duckdb").write_bytes(b"not a database" * 100)
    args = ("ingest", "-b", broker.bootstrap_servers, "--data-dir", str(tmp_path / "data"))
    plain = stylestream(*args, cwd=tmp_path)
    out = plain.stdout + plain.stderr
    assert plain.returncode == RUNTIME and "Traceback" not in out, out
    assert "error: StoreError: cannot open the state database" in " ".join(out.split()), out
    debug = stylestream(*args, cwd=tmp_path, env={"STYLESTREAM_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stdout + debug.stderr


def interrupt(when: float | str, *args: str, cwd: Path, sig: int = signal.SIGINT) -> tuple[int, str, float]:
    """Run a command and send `sig` after `when` seconds, or once its output shows the text `when`;
    (exit status, output, seconds from the signal to exit)."""
    proc = subprocess.Popen([COMMAND, *args], cwd=cwd, text=True,  # as a user runs it: the console script
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + (when if isinstance(when, float) else 120)
    def seen() -> bool:
        return isinstance(when, str) and when in "".join(lines)
    while time.monotonic() < deadline and proc.poll() is None and not seen():
        time.sleep(0.05)
    t0 = time.monotonic()
    proc.send_signal(sig)
    try:
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    return proc.returncode, "".join(lines), time.monotonic() - t0


@pytest.mark.slow
def test_ctrl_c_or_sigterm_at_any_moment_ends_without_a_traceback(tmp_path, broker):
    """Long commands stop cleanly: a demo while it loads models and while it ingests (Ctrl-C ends it,
    exit 130), commands that retry an absent broker, which stop at once with exit 0 (no cycle or
    batch is running), and the API, which answers what it has in progress and exits 0."""
    unreachable = f"127.0.0.1:{free_port()}"
    data = ["--data-dir", str(tmp_path / "data")]
    key = tmp_path / "key.pem"
    key.write_bytes(DemoIssuer(tmp_path / "issuer").public_key_pem())
    api = ["api", "-b", broker.bootstrap_servers, "--jwt-public-key", str(key), "--port", "0", *data]
    retrying = "retrying in"
    cases = [
        (0.3, ["demo", *data], signal.SIGINT, 130),  # while its libraries load
        (1.0, ["demo", *data], signal.SIGINT, 130),
        (8.0, ["demo", *data], signal.SIGINT, 130),
        (retrying, ["ingest", "-b", unreachable, "--follow", *data], signal.SIGINT, 0),
        (retrying, ["ingest", "-b", unreachable, "--follow", *data], signal.SIGTERM, 0),
        (retrying, ["serve", "-b", unreachable, *data], signal.SIGINT, 0),
        (retrying, ["serve", "-b", unreachable, *data], signal.SIGTERM, 0),
        ("the page:", api, signal.SIGINT, 0),
        ("the page:", api, signal.SIGTERM, 0),
    ]
    failures, stops = [], []
    for when, args, sig, status in cases:
        got, out, stop = interrupt(when, *args, cwd=tmp_path, sig=sig)
        stops.append((args[0], signal.Signals(sig).name, round(stop, 2)))
        stopped_waiting = when != retrying or "stopped before the broker answered" in out
        if got != status or "Traceback" in out or not stopped_waiting:
            failures.append(f"{args} at {when!r}, {signal.Signals(sig).name}: exit {got} {stop:.1f} s after the "
                            f"signal:\n{out[-1500:]}")
    print("seconds from the signal to exit:", stops)
    assert not failures, "\n\n".join(failures)


CTRL_C_SCRIPT = """
import importlib, os, signal, time
from stylestream.cli import main as script  # the console script, before the module shadows its name

command = importlib.import_module("stylestream.cli.main")


class Finalized:
    def __del__(self):
        raise KeyboardInterrupt  # as when the interrupt lands in a finalizer: Python ignores it there


def swallowing():
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
    except KeyboardInterrupt:
        pass  # a library that takes the interrupt for an error of its own and carries on
    Finalized()
    time.sleep(30)
    print("ran to its end")


def stopping_in_order():
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
    finally:
        time.sleep(4 * command.CARRYING_ON_S)  # an orderly stop (a broker's) while the interrupt unwinds
        print("stopped in order")


command.app = {stopping}
script()
"""


def run_ctrl_c_script(stopping: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", CTRL_C_SCRIPT.replace("{stopping}", stopping)],
                          capture_output=True, text=True, timeout=60)
    return done, time.monotonic() - t0


def test_a_ctrl_c_a_library_swallowed_comes_again_at_once_and_an_ignored_one_prints_nothing():
    done, seconds = run_ctrl_c_script("swallowing")
    # Well before INSIST_S (30 s): the command ran on with nothing unwinding it.
    assert done.returncode == 130 and seconds < 15, (seconds, done.returncode, done.stdout, done.stderr)
    assert "ran to its end" not in done.stdout
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr


def test_a_ctrl_c_unwinding_through_an_orderly_stop_is_not_sent_again():
    done, _ = run_ctrl_c_script("stopping_in_order")
    assert done.returncode == 130 and "stopped in order" in done.stdout, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
