"""On-device styles (transforms/device.py): contributions computed on the person's device with
ingestion's own code count exactly as uploads ingestion decodes itself; bad ones are dead letters."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime

import numpy as np
import pytest
import requests
from helpers import dead_letters, latest_styles, produce, read_topic
from typer.testing import CliRunner

from stylestream.cli.main import app
from stylestream.demo.synthetic import make_library
from stylestream.schemas.events import (
    DeviceBasis,
    PhotoEmbedded,
    StyleLearningToggled,
    UserForgotten,
    encode_event,
    parse_event,
)
from stylestream.streams.topics import CONSENT_EVENTS, PHOTO_EVENTS, STYLE_MANIFESTS
from stylestream.transforms.device import DevicePhoto, contributions, device_basis
from stylestream.transforms.embed import OpenClipImageHandler
from stylestream.transforms.pixels import DecodeLimits

pytestmark = pytest.mark.slow
runner = CliRunner(env={"COLUMNS": "300"})


def device_events(photos, user: str, clip, limits: DecodeLimits) -> list[PhotoEmbedded]:
    handler = OpenClipImageHandler(clip, device="cpu")
    found = [DevicePhoto(p.photo_id, p.album_id, p.path.read_bytes(), p.taken_at) for p in photos]
    made = contributions(found, clip, limits, handler, handler.load_model())
    return [c.as_event(user, datetime.now(UTC)) for c in made]


def manifests(bs: str) -> dict[str, dict]:
    """Each person's latest manifest."""
    out = {}
    for m in read_topic(bs, STYLE_MANIFESTS):
        if m.value:
            e = parse_event(STYLE_MANIFESTS, m.value)
            out[e.user_id] = e
    return out


def test_a_device_made_style_is_the_servers_and_bad_contributions_are_dead_letters(broker, make_ingestor,
                                                                                       clip, tmp_path):
    bs = broker.bootstrap_servers
    photos = make_library(tmp_path / "lib", {"ana": [("beach", "warm", 3), ("office", "cool", 3)]})
    ingestor = make_ingestor()
    # 1. The same photos: uploaded for the server to decode (ana), analysed on a device (dev)
    from_device = device_events(photos, "dev", clip, ingestor.cfg.limits)
    assert all(isinstance(e, PhotoEmbedded) for e in from_device)
    fields = {"schema_version", "type", "event_id", "user_id", "event_time", "photo_id", "album_id", "taken_at",
              "sha256", "size_bytes", "embedding", "features", "basis"}
    assert all(set(json.loads(encode_event(e))) == fields for e in from_device)  # nothing else travels
    produce(bs, PHOTO_EVENTS, [p.upload_event() for p in photos] + from_device)
    ingestor.run_until_caught_up()
    styles, made = latest_styles(bs), manifests(bs)
    server, device = styles["ana"], styles["dev"]
    assert device.photo_count == server.photo_count == 6
    assert np.abs(np.asarray(device.embedding) - np.asarray(server.embedding)).max() <= 1e-6
    assert max(abs(device.features[n] - server.features[n]) for n in server.features) <= 1e-6
    assert made["dev"].style_code == made["ana"].style_code
    rows = lambda m: [(p.photo_id, p.sha256, p.weight, p.album_id) for p in m.photos]  # noqa: E731
    assert rows(made["dev"]) == rows(made["ana"])
    assert {p.computed_on for p in made["dev"].photos} == {"device"}
    assert {p.computed_on for p in made["ana"].photos} == {"server"}

    # 2. Each bad contribution is a dead letter with its reason, and nothing else changes
    good = from_device[0].model_dump(mode="json")
    other = DeviceBasis(**{**good["basis"], "weights": "sha256:" + "0" * 64})
    bad = {
        "basis": good | {"photo_id": "x1", "basis": other.model_dump()},
        "validate": good | {"photo_id": "x2", "embedding": [0.6, 0.8]},
        "not finite": good | {"photo_id": "x3", "features": good["features"] | {"brightness": float("nan")}},
        "unit length": good | {"photo_id": "x4", "embedding": [2 * x for x in good["embedding"]]},
        "exactly the named": good | {"photo_id": "x5", "features": {"brightness": 0.5}},
        "known with another file": good | {"event_id": "changed", "sha256": "f" * 64},  # a photo it counts
    }
    produce(bs, PHOTO_EVENTS, [(b"dev", json.dumps(e).encode()) for e in bad.values()])
    ingestor.run_until_caught_up()
    assert latest_styles(bs)["dev"].version == device.version
    reasons = sorted(reason for stage, reason in dead_letters(bs).values())
    assert len(reasons) == 6, reasons
    assert any("computed with another basis: weights" in r for r in reasons)
    assert any("2 dimensions" in r for r in reasons)
    for expected in ("not finite", "unit length", "exactly the named", f"photo {good['photo_id']} is known with "):
        assert any(expected in r for r in reasons), (expected, reasons)

    # 3. Withdrawn like any photo: the office album off, then on again (its contributions re-published
    #    from the state, with no device involved), then forgotten
    def switch(enabled: bool, hour: int) -> None:
        produce(bs, CONSENT_EVENTS, [StyleLearningToggled(
            event_id=f"t{hour}", user_id="dev", event_time=datetime(2026, 1, 1, hour, tzinfo=UTC), scope="album",
            scope_id="office", enabled=enabled)])
        ingestor.run_until_caught_up()
    switch(False, 1)
    assert latest_styles(bs)["dev"].photo_count == 3
    switch(True, 2)
    back = latest_styles(bs)["dev"]
    assert back.photo_count == 6 and np.abs(np.asarray(back.embedding) - np.asarray(server.embedding)).max() <= 1e-6
    assert device_basis(clip, ingestor.cfg.limits) == from_device[0].basis
    produce(bs, CONSENT_EVENTS, [UserForgotten(event_id="forget-dev", user_id="dev", event_time=datetime.now(UTC))])
    ingestor.run_until_caught_up()
    assert "dev" not in latest_styles(bs) and "ana" in latest_styles(bs)


def test_a_person_syncs_from_their_device_through_the_api(api_system, clip, tmp_path, monkeypatch):
    """`stylestream device sync` with a photos:contribute grant: contributions, never image bytes, become
    dora's style; a second sync sends nothing; the style verifies from the same folder; the grant can
    neither read her style nor speak for anyone else."""
    library = tmp_path / "library"
    photos = make_library(library, {"dora": [("hikes", "green", 3), ("city", "mono", 2)]})
    files = [p.path.read_bytes() for p in photos]
    dora = api_system.token("dora")
    headers = {"Authorization": f"Bearer {dora}"}
    made = requests.post(f"{api_system.url}/v1/me/grants", headers=headers, timeout=30,
                         json={"name": "phone", "scopes": ["photos:contribute"]}).json()
    phone = {"Authorization": f"Bearer {made['token']}"}
    assert requests.get(f"{api_system.url}/v1/me/style", headers=phone, timeout=30).status_code == 403
    sent: list[bytes] = []
    real = requests.Session.request

    def recording(self, method, url, **kw):  # the real request, its body kept for the check below
        sent.append(json.dumps(kw.get("json")).encode())
        return real(self, method, url, **kw)
    monkeypatch.setattr(requests.Session, "request", recording)
    args = ["device", "sync", str(library), "--api", api_system.url, "--clip-pretrained", clip.pretrained,
            "--data-dir", str(tmp_path / "data")]
    masked = runner.invoke(app, [*args, "--mask-faces"], env={"STYLESTREAM_TOKEN": made["token"]})
    assert masked.exit_code == 1 and "another basis: preprocessing" in masked.output, masked.output
    first = runner.invoke(app, args, env={"STYLESTREAM_TOKEN": made["token"]})
    assert first.exit_code == 0, first.output
    assert "5 contributions sent, 0 held already" in first.output
    assert not any(f[i:i + 48] in body or base64.b64encode(f[i:i + 48]) in body
                   for f in files for i in (0, len(f) // 2) for body in sent)  # no image bytes travel
    deadline = time.monotonic() + 90
    while (style := requests.get(f"{api_system.url}/v1/me/style", headers=headers, timeout=30)).status_code != 200:
        assert time.monotonic() < deadline, "ingestion never counted dora's contributions"
        time.sleep(0.5)
    assert style.json()["photo_count"] == 5
    listed = requests.get(f"{api_system.url}/v1/me/photos", headers=headers, timeout=30).json()["photos"]
    assert len(listed) == 5 and all(p["on_device"] for p in listed)
    again = runner.invoke(app, args, env={"STYLESTREAM_TOKEN": made["token"]})
    assert again.exit_code == 0 and "0 contributions sent, 5 held already" in again.output, again.output

    # Her style verifies from the same folder, on her own machine
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(requests.get(f"{api_system.url}/v1/me/export", headers=headers,
                                                timeout=30).json()["manifest"]))
    verified = runner.invoke(app, ["verify", "--manifest", str(manifest), "--photos", str(library),
                                   "--clip-pretrained", clip.pretrained, "--data-dir", str(tmp_path / "data")])
    assert verified.exit_code == 0, verified.output

    # The grant speaks for dora only (her style is what it sent): a contribution naming anyone is refused
    one = next(json.loads(b) for b in sent if b != b"null")["contributions"][0]
    body = {"contributions": [{**one, "user_id": "ben"}]}
    refused = requests.post(f"{api_system.url}/v1/me/contributions", headers=phone, json=body, timeout=30)
    assert refused.status_code == 400 and "user_id" in refused.json()["error"]["message"]
