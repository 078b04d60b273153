"""Two `stylestream api` processes behind one address (SO_REUSEPORT) share one rate limit per person
through Redis (Debian's redis-server, started here) and show a person the same things."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
from helpers import produce

from stylestream.api.system import DemoIssuer
from stylestream.demo.synthetic import make_library
from stylestream.pipelines.ingest import IngestConfig, Ingestor
from stylestream.pipelines.layout import DataLayout
from stylestream.streams.broker_process import free_port, port_open
from stylestream.streams.topics import PHOTO_EVENTS

pytestmark = pytest.mark.slow
REPLICA = "X-Stylestream-Replica"
LIMIT = 30  # requests a minute, per person: enough that the kernel sends some to each replica


@pytest.fixture
def redis_url(tmp_path):
    """A Redis on loopback, with nothing kept on disk (`make redis` installs Debian's)."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed: `make redis` installs Debian's")
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not port_open(port):
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def get(url: str, token: str | None = None) -> requests.Response:
    # A new connection each time (no session): the kernel picks a replica per connection.
    return requests.get(url, headers={"Authorization": f"Bearer {token}"} if token else {}, timeout=30)


def test_two_replicas_share_one_rate_limit_per_person_and_agree(broker, clip, redis_url, tmp_path):
    bs = broker.bootstrap_servers
    data = tmp_path / "data"
    photos = make_library(tmp_path / "lib", {"rae": [("a", "warm", 2)], "sol": [("b", "cool", 2)]})
    produce(bs, PHOTO_EVENTS, [p.upload_event() for p in photos])
    with Ingestor(IngestConfig(bs, DataLayout(data).state.root, clip)) as ingestor:
        ingestor.run_until_caught_up()
    issuer = DemoIssuer(tmp_path / "issuer")
    public = tmp_path / "issuer.pub"
    public.write_bytes(issuer.public_key_pem())
    port = free_port()
    command = [str(Path(sys.executable).parent / "stylestream"), "api", "-b", bs, "--jwt-public-key", str(public),
               "--data-dir", str(data), "--port", str(port), "--reuse-port", "--rate-limits", redis_url,
               "--person-rate", f"{LIMIT}/minute"]
    replicas = [subprocess.Popen(command, stdout=(tmp_path / f"api-{i}.log").open("w"), stderr=subprocess.STDOUT)
                for i in range(2)]
    url = f"http://127.0.0.1:{port}"
    try:
        # 1. Both answer on the one address
        seen: set[str] = set()
        deadline = time.monotonic() + 90
        while len(seen) < 2:
            assert all(r.poll() is None for r in replicas), (tmp_path / "api-0.log").read_text()[-2000:]
            assert time.monotonic() < deadline, f"replicas seen: {seen}"
            try:
                seen.add(get(f"{url}/livez").headers[REPLICA])
            except requests.ConnectionError:
                time.sleep(0.2)
        # 2. One limit for the person, whichever replica counts a request
        rae = issuer.token("rae")
        answers = [get(f"{url}/v1/me/style", rae) for _ in range(LIMIT + 6)]
        assert Counter(a.status_code for a in answers) == Counter({200: LIMIT, 429: 6}), [a.text for a in answers]
        assert len({a.headers[REPLICA] for a in answers if a.status_code == 200}) == 2  # both counted some
        # 3. What each shows a person is the same: her style, and a grant made through one of them
        sol = issuer.token("sol")
        made = requests.post(f"{url}/v1/me/grants", json={"name": "frame", "scopes": ["style:read"]},
                             headers={"Authorization": f"Bearer {sol}"}, timeout=30)
        assert made.status_code == 201, made.text
        shown: dict[str, set] = {}
        for _ in range((LIMIT - 1) // 2):  # within her limit: two requests a round
            style, grants = get(f"{url}/v1/me/style", sol), get(f"{url}/v1/me/grants", sol)
            assert style.status_code == grants.status_code == 200, (style.text, grants.text)
            shown.setdefault(style.headers[REPLICA], set()).add((style.text, grants.text))
            if len(shown) == 2:
                break
        assert len(shown) == 2 and len({frozenset(s) for s in shown.values()}) == 1, shown
        assert '"frame"' in next(iter(shown.values())).pop()[1]
    finally:
        for r in replicas:
            r.terminate()
        for r in replicas:
            r.wait(30)
