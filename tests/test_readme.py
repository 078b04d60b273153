"""Every command the README shows runs as written, in the README's order, the way a newcomer runs them
after `make demo`: in a fresh folder, with `stylestream` on PATH.

What only a real deployment has is put in place by the test, each with its reason (`STAND_INS`), and
the three commands that would take hours are shortened by named options (`SHORTENED`). A command the
README gains that this test does not know how to run fails the test.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
from helpers import produce

from stylestream.demo.synthetic import make_library
from stylestream.schemas.events import GenerationRequested
from stylestream.schemas.tables import FEATURE_NAMES
from stylestream.streams.broker_process import free_port
from stylestream.streams.topics import GENERATION_REQUESTS, PHOTO_EVENTS
from stylestream.transforms.pixels import KEPT_METADATA

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent


def readme_commands(text: str) -> list[str]:
    """The commands of the README's ```sh blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


def stand_ins(tmp: Path, kafka: str, cluster: str, models: dict[str, Path]) -> dict[str, str]:
    """README placeholder -> what the test uses instead (and why, in the comment)."""
    return {
        "KAFKA": kafka,  # the address `stylestream broker` printed, as the README says
        "kafka1:9092": cluster,  # "your cluster": a second local broker
        "/srv/stylestream-vit-b32": str(tmp / "srv" / "stylestream-vit-b32"),  # /srv needs root
        "/srv/stylestream-flink": str(tmp / "srv" / "stylestream-flink"),
        "/srv/stylestream": str(tmp / "srv" / "stylestream"),
        "~/Pictures": str(tmp / "Pictures"),  # a synthetic library: albums as first-level folders
        "IMAGES": str(tmp / "groups"),  # a synthetic training set: groups as first-level folders
        "/models/open_clip_vit_b32.safetensors": str(models["vit_b32"]),  # ViT-B-32, random weights
        "/models/stable-diffusion-v1-5": str(models["diffusion"]),  # SD-1.5's layout, tiny config, random
        "/models/style-adapter.safetensors": "runs/adapter/ip-adapter.safetensors",  # the one trained above
        "s3://bucket/stylestream-images": str(tmp / "images"),  # no object store here
        ".venv/bin/python": sys.executable,
    }


# Commands that would take hours, with the options that make them take seconds.
SHORTENED = {
    "train-adapter": {"--steps": "2", "--resolution": "64", "--batch-size": "2"},
    "stylestream.models.tiny_style": {"--steps": "2", "--vae-steps": "2", "--per-look": "2", "--batch-size": "4",
                                      "--clip-steps": "2", "--clip-images": "64"},
}
# Commands not run here, and why.
NOT_RUN = {
    "make test": "the command that runs this test (CI runs it)",
    "make flink": "`make test` builds the Flink job's environment before the tests",
    ". .venv/bin/activate": "the test runs with the virtual environment's bin folder first on PATH",
}


def shortened(command: str, tmp: Path) -> str:
    for key, options in SHORTENED.items():
        if key in command:
            words = shlex.split(command)
            for option, value in options.items():
                if option in words:
                    words[words.index(option) + 1] = value
                else:
                    words += [option, value]
            if key == "stylestream.models.tiny_style":  # never over the shipped models
                words += ["--out", str(tmp / "tiny-style"), "--clip-out", str(tmp / "tiny-clip.safetensors")]
            return shlex.join(words)
    return command


# Servers the README starts on a fixed port: here on a free one (port 8000 may be taken on a test host).
ON_A_FREE_PORT = ("stylestream demo --serve", "stylestream api ")


def on_a_free_port(command: str) -> str:
    if not command.startswith(ON_A_FREE_PORT):
        return command
    words = shlex.split(command)
    if "--port" in words:
        words[words.index("--port") + 1] = str(free_port())
    else:
        words += ["--port", str(free_port())]
    return shlex.join(words)


def substitute(command: str, values: dict[str, str]) -> str:
    for placeholder, value in values.items():  # longest first where one contains another (ordered above)
        command = re.sub(rf"(?<![\w/.-]){re.escape(placeholder)}(?![\w/.-])", value, command)
    return command


class Background:
    """A long-running command: started, watched for a line, stopped with Ctrl-C (SIGINT)."""

    def __init__(self, command: str, cwd: Path, env: dict, log: Path):
        self.log = log
        self.proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=cwd, env=env, text=True,
                                     stdout=log.open("w"), stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, pattern: str, timeout: float = 180) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m := re.search(pattern, self.output()):
                return m
            assert self.proc.poll() is None, f"exited with {self.proc.returncode}:\n{self.output()}"
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.output()}")

    def interrupt(self) -> float:
        """Ctrl-C; the seconds until the command exited (status 0)."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        assert self.proc.returncode == 0, self.output()
        return time.monotonic() - t0


@pytest.fixture
def models(tmp_path, diffusion) -> dict[str, Path]:
    """A ViT-B-32 checkpoint with random weights (open_clip writes no file for random weights)."""
    import open_clip
    from safetensors.torch import save_file

    vit = open_clip.create_model("ViT-B-32")
    path = tmp_path / "open_clip_vit_b32.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return {"vit_b32": path, "diffusion": Path(diffusion.model_dir)}


@pytest.mark.slow
def test_every_readme_command_works_as_written(tmp_path, broker, models):
    commands = readme_commands(README.read_text())
    work = tmp_path / "newcomer"
    work.mkdir()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "COLUMNS": "120", "HF_HUB_OFFLINE": "1"}
    env.pop("STYLESTREAM_BOOTSTRAP_SERVERS", None)
    make_library(tmp_path / "Pictures", {"ana": [("beach", "warm", 3), ("office", "cool", 2)]})
    make_library(tmp_path / "groups", {"warm": [("a", "warm", 3)], "mono": [("a", "mono", 3)]})
    service = make_library(tmp_path / "service", {"dan": [("a", "green", 2)]})  # uploads a photo service sends
    values: dict[str, str] = {}
    outputs: dict[str, str] = {}
    stops: dict[str, float] = {}
    kafka = None
    started: list[Background] = []  # every long-running command, killed at the end if a step failed

    def start(command: str, log: str) -> Background:
        started.append(Background(command, work, env, tmp_path / log))
        return started[-1]

    def run(command: str) -> str:
        done = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True,
                              timeout=600)
        out = done.stdout + done.stderr
        assert done.returncode == 0 and "Traceback" not in out, f"{command}\n{out}"
        return out

    try:
        for i, readme_command in enumerate(commands):
            if readme_command in NOT_RUN:
                continue
            if readme_command == "make demo":  # its recipe, without re-making the environment
                assert "$(BIN)/stylestream demo" in (ROOT / "Makefile").read_text()
                outputs["demo"] = run("stylestream demo")
                continue
            if readme_command == "stylestream broker":
                kafka = start(readme_command, "broker.log")
                address = kafka.wait_for(r"listening on (\S+:\d+)").group(1)
                values = stand_ins(tmp_path, address, broker.bootstrap_servers, models)
                produce(broker.bootstrap_servers, PHOTO_EVENTS, [p.upload_event() for p in service])  # "yours"
                continue
            command = on_a_free_port(shortened(substitute(readme_command, values), tmp_path))
            if command.startswith(ON_A_FREE_PORT):
                # long-running: the address it prints serves the page and, with a token, the person's style
                running = start(command, f"{i}.log")
                url = running.wait_for(r"(http://127\.0\.0\.1:\d+)/", timeout=300).group(1)
                if command.startswith("stylestream demo"):
                    user, token = "ana", running.wait_for(r"#token=(\S+)").group(1)
                else:
                    user, token = "ben", outputs["stylestream api-token ben"].split()[-1]
                assert "<title>Your style" in requests.get(url, timeout=30).text
                me = requests.get(f"{url}/v1/me", headers={"Authorization": f"Bearer {token}"}, timeout=30)
                assert me.status_code == 200 and me.json()["user_id"] == user, me.text
                stops[command.split(" -")[0]] = running.interrupt()
                outputs[readme_command] = running.output()
            elif command.startswith("stylestream device sync"):
                # the service's API on the README's state, here on a free port, and Ana's token signed with
                # the demo issuer's key, as the README says
                srv = values["/srv/stylestream"]
                signed = run(f"stylestream api-token ana --data-dir {srv}")
                key, token = re.search(r"--jwt-public-key (\S+)", signed).group(1), signed.split()[-1]
                api = start(f"stylestream api -b {values['KAFKA']} --data-dir {srv} --jwt-public-key {key} "
                            f"--port {free_port()}", f"{i}-api.log")
                url = api.wait_for(r"(http://127\.0\.0\.1:\d+)/").group(1)
                outputs[readme_command] = run(command.replace("http://127.0.0.1:8000", url).replace("ANA_TOKEN", token))
                stops["api (device sync)"] = api.interrupt()
            elif command.startswith(("stylestream flink-job", "stylestream history follow")):
                # long-running beside a streaming runner: it starts against the broker, then Ctrl-C
                running = start(command, f"{i}.log")
                running.wait_for(r"transaction timeout \d+ s|writing the history of", timeout=300)
                stops[command.split(" -")[0]] = running.interrupt()
                outputs[readme_command] = running.output()
            elif "--follow" in command:
                follow = start(command, f"{i}.log")
                produce(address, PHOTO_EVENTS, [p.upload_event() for p in service])  # the photo service
                follow.wait_for(r"cycle \d+: 2 events, 2 photos")
                stops["ingest --follow"] = follow.interrupt()
                outputs[readme_command] = follow.output()
            elif command.startswith("stylestream serve"):
                serve = start(command, f"{i}.log")
                serve.wait_for(r"serving with")
                request = GenerationRequested(
                    event_id=f"readme-{i}", user_id="dan", event_time=datetime.now(UTC), request_id=f"readme-{i}",
                    prompt="a birthday card", allow_unpersonalized=True)
                produce(broker.bootstrap_servers if "kafka1:9092" in readme_command else address,
                        GENERATION_REQUESTS, [request])
                serve.wait_for(rf"readme-{i}: \S+\.png")
                stops[f"serve ({i})"] = serve.interrupt()
                outputs[readme_command] = serve.output()
            else:
                outputs[readme_command] = run(command)
                if readme_command.startswith("stylestream forget"):  # the id it prints, for `receipt get`
                    values["REQUEST_ID"] = re.search(r"requested: (\S+)", outputs[readme_command]).group(1)
    finally:
        try:
            if kafka is not None:
                kafka.interrupt()
        finally:
            for left in started:  # a step that failed left its command running
                if left.proc.poll() is None:
                    left.proc.kill()
                    left.proc.wait()
    print("seconds from Ctrl-C to exit:", {k: round(v, 2) for k, v in stops.items()})

    # What the README promises of the demo's history: real drift, in words and in a timeline, for its people
    ben = outputs["stylestream drift user ben --plot ben.png"]
    assert "no clear change" not in ben and re.search(r"darker|deeper shadows|cooler|warmer", ben), ben
    assert (work / "ben.png").stat().st_size > 10_000
    top = outputs["stylestream drift top --since 30d -n 10"]
    assert len(re.findall(r"^u[0-9a-f]{32} ", top, re.M)) == 3, top  # the demo's people, by pseudonym
    assert re.search(r"^3 ", outputs["stylestream drift population --since 90d --threshold 0.05"], re.M)
    assert len(outputs["stylestream drift timeline ana --format csv"].splitlines()) == 3  # header, 2 versions
    # ...and of privacy: ana verifies her style from her own files, is forgotten with a valid receipt,
    # and the audit finds nothing of her
    def output_of(start: str) -> str:
        [out] = [text for command, text in outputs.items() if command.startswith(start)]
        return out
    assert "the published vector is the one these photos give" in output_of("stylestream verify --manifest")
    assert "valid" in output_of("stylestream receipt verify")
    # ...and syncs her library from her device: analysed here, sent as contributions, none of it twice
    synced = output_of("stylestream device sync")
    assert re.search(r"\d+ photos in \S+: \d+ contributions? sent, \d+ held already", synced), synced
    assert re.search(r"nothing found|^0 findings", output_of("stylestream audit --user ana"), re.M)


def test_readme_lists_exactly_the_features_and_metadata_the_code_keeps():
    text = README.read_text()
    section = text[text.index("## What a style is"):text.index("Consent: a toggle")]
    table = re.findall(r"^\| (`.+?) \|", section, re.M)
    named = [n for row in table for n in re.findall(r"`(\w+)`", row)]
    palette = [n for n in named if n.startswith("palette")]
    assert palette == ["palette1_l", "palette3_b"]  # the README writes the nine as a range
    listed = [n for n in named if not n.startswith("palette")] + [n for n in FEATURE_NAMES if n.startswith("palette")]
    assert listed == list(FEATURE_NAMES)
    assert f"and {len(FEATURE_NAMES)} interpretable aesthetic" in section.replace("\n", " ")
    kept = section[section.index("only these are kept"):section.index("never")]
    assert re.findall(r"`(\w+)`", kept)[1:] == list(KEPT_METADATA)  # [0] is KEPT_METADATA itself


def test_every_readme_command_is_one_the_test_can_run():
    """A new kind of command in the README must be taught to the README test, not skipped by it."""
    known = ("stylestream ", "make demo", ".venv/bin/python -m stylestream.models.tiny_style", *NOT_RUN)
    commands = readme_commands(README.read_text())
    assert commands and all(c.startswith(known) for c in commands), [c for c in commands if not c.startswith(known)]
    assert commands.count("stylestream broker") == 1  # one local broker serves the rest
