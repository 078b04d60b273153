"""`stylestream demo` runs the whole system and reports what happened."""

from __future__ import annotations

import io
import re
import threading
import time
from pathlib import Path

import pytest
import requests
from rich.console import Console
from typer.testing import CliRunner

from stylestream.cli.main import app
from stylestream.demo.run import DEMO_CLIP, DEMO_PROMPTS, clip_id, request_id, run_demo
from stylestream.serving.clips import decode_mp4


@pytest.mark.smoke
@pytest.mark.slow
def test_demo_end_to_end(tmp_path, broker_engine):
    """The demo, then (as `demo --serve`) its services kept running: the printed page address and
    sign-in token work, until the demo is told to stop."""
    out, stop, reports = io.StringIO(), threading.Event(), []
    demo = threading.Thread(target=lambda: reports.append(
        run_demo(tmp_path, Console(file=out, width=200), broker_engine, serve_until=lambda: stop, port=0)))
    demo.start()
    deadline = time.monotonic() + 600
    while not (served := re.search(r"the page for ana: (http://\S+)/#token=(\S+)", out.getvalue())):
        assert demo.is_alive() and time.monotonic() < deadline, out.getvalue()
        time.sleep(0.5)
    url, token = served.groups()
    assert "<title>Your style" in requests.get(url, timeout=30).text
    style = requests.get(f"{url}/v1/me/style", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    stop.set()
    demo.join(timeout=120)
    assert not demo.is_alive()
    [report] = reports
    assert style.status_code == 200 and style.json()["version"] == report["after"]["ana"][0]
    assert report["before"]["ana"][3] == 14 and report["after"]["ana"][3] == 10  # the album opt-out
    assert report["after"]["ana"][0] == report["before"]["ana"][0] + 1
    assert report["after"]["ben"][0] == report["before"]["ben"][0]
    outcomes = sorted((r.request_id, r.type) for r in report["results"])
    people = [request_id(u, k) for u in ("ana", "ben", "cleo") for k in range(len(DEMO_PROMPTS))]
    clips = [clip_id(u) for u in ("ana", "ben", "cleo")]
    assert outcomes == sorted([(rid, "generation_completed") for rid in people + clips] +
                              [("demo-nobody", "generation_failed")])
    assert len(list((report["run_dir"] / "images").rglob("*.png"))) == len(people)
    assert sorted(report["clips"]) == ["ana", "ben", "cleo"]
    for uri in report["clips"].values():
        assert len(decode_mp4(Path(uri.removeprefix("file://")).read_bytes())) == DEMO_CLIP.frames
        assert "a short clip in" in out.getvalue() and uri in out.getvalue()
    text = out.getvalue()
    assert "1 dead letter," in text and "opt-out effect" in text
    assert "does each image follow its person's style?" in text and report["picture"].stat().st_size > 10_000


def test_cli_help_explains_every_command():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("broker", "ingest", "serve", "demo", "schemas", "train-adapter"):
        assert command in result.output
    ingest_help = CliRunner().invoke(app, ["ingest", "--help"], env={"COLUMNS": "200"}).output
    for option in ("--bootstrap-servers", "--clip-pretrained", "--follow", "--until-caught-up"):
        assert option in ingest_help
