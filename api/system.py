"""The running services on one machine, each in a thread: ingestion following the topics, a serving
worker, and the API under uvicorn. `stylestream demo --serve` and the API's tests run them this way;
in production each is its own process (`stylestream ingest --follow`, `serve`, `api`)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from pathlib import Path

import uvicorn
from cryptography.hazmat.primitives import serialization

from stylestream.api.app import create_app
from stylestream.api.auth import TokenVerifier, issue_person_token
from stylestream.api.config import ApiConfig
from stylestream.keyfiles import create_once, new_ed25519_pem, public_key_pem

ISSUER_KEY_FILE = "demo-issuer.key"  # the demo's stand-in for a photo service's token-signing key


class ApiServer:
    """uvicorn serving an app in a thread, on a free port of `host` unless `port` is given."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 reuse_port: bool = False):
        """`reuse_port`: share the port with other processes doing the same (SO_REUSEPORT; the kernel
        spreads connections across them): replicas behind one address with no proxy in front."""
        # In a thread uvicorn leaves signals alone: the caller decides when it stops (`__exit__`).
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                     timeout_graceful_shutdown=5))
        sockets = None
        if reuse_port:
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                sock.bind((host, port))
            except OSError as e:
                sock.close()
                raise RuntimeError(f"cannot listen on {host}:{port} ({e.strerror}): is a process that does not "
                                   "share it (no --reuse-port) there?") from None
            sockets = [sock]
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": sockets}, name="api", daemon=True)

    def __enter__(self) -> ApiServer:
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the API server did not start (is the port free and the broker up?)")
            time.sleep(0.05)
        return self

    @property
    def url(self) -> str:
        host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


class DemoIssuer:
    """Plays the photo service: signs people's sign-in tokens with a key kept under the data dir."""

    def __init__(self, folder: Path):
        self.key_path = folder / ISSUER_KEY_FILE
        create_once(self.key_path, new_ed25519_pem())
        self._pem = self.key_path.read_bytes()

    def public_key_pem(self) -> bytes:
        return public_key_pem(serialization.load_pem_private_key(self._pem, password=None))

    def verifier(self) -> TokenVerifier:
        return TokenVerifier({None: serialization.load_pem_public_key(self.public_key_pem())})

    def token(self, user_id: str, lifetime: timedelta = timedelta(hours=12)) -> str:
        return issue_person_token(self._pem, user_id, lifetime)


def _thread(name: str, target: Callable[[], None], failures: list) -> threading.Thread:
    def run() -> None:
        try:
            target()
        except Exception as e:  # kept, to be raised when the services stop
            failures.append((name, e))
            raise
    return threading.Thread(target=run, name=name, daemon=True)


@contextmanager
def running_services(api: ApiConfig, ingest=None, serve=None, generator=None, port: int = 0) -> Iterator[ApiServer]:
    """Ingestion following (an IngestConfig), a serving worker (a ServeConfig and its StyleGenerator)
    and the API, until the block ends; each one left out (None) is not started."""
    from stylestream.pipelines.ingest import Ingestor
    from stylestream.serving.worker import Worker

    stop, failures, threads = threading.Event(), [], []

    def ingesting() -> None:
        with Ingestor(ingest) as ingestor:
            ingestor.run(stop, follow=True)

    def serving() -> None:
        with Worker(serve, generator) as worker:
            worker.run(stop=stop)

    if ingest is not None:
        threads.append(_thread("ingest", ingesting, failures))
    if serve is not None:
        threads.append(_thread("serve", serving, failures))
    with ExitStack() as stack:
        for t in threads:
            t.start()
        stack.callback(lambda: [t.join(timeout=60) for t in threads])
        stack.callback(stop.set)
        yield stack.enter_context(ApiServer(create_app(api), port=port))
    if failures:
        name, error = failures[0]
        raise RuntimeError(f"the {name} service failed: {error}") from error
