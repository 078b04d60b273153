"""`stylestream api` against the running system (real broker, ingestion, serving worker, uvicorn):
the official OpenAI client, who may do what, limits and errors, the person's own endpoints."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import sqlite3
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import openai
import pytest
import requests
from PIL import Image

from stylestream.api.app import create_app
from stylestream.api.auth import new_grant
from stylestream.api.config import ApiConfig
from stylestream.api.store import ApiStore
from stylestream.api.system import ApiServer, DemoIssuer
from stylestream.privacy.audit import audit_files
from stylestream.schemas.events import parse_event
from stylestream.serving.clips import decode_mp4
from stylestream.serving.image_store import ImageStore, NotInStore
from stylestream.streams import clients
from stylestream.streams.topics import CONSENT_EVENTS, GENERATION_RESULTS, STYLE_VECTORS

pytestmark = pytest.mark.slow


def call(system, method: str, path: str, token: str | None, headers_extra: dict | None = None,
         **kw) -> requests.Response:
    headers = ({"Authorization": f"Bearer {token}"} if token else {}) | (headers_extra or {})
    return requests.request(method, f"{system.url}{path}", headers=headers, timeout=120, **kw)


def grant(system, user: str, scopes: list[str], name: str = "an app") -> dict:
    r = call(system, "POST", "/v1/me/grants", system.token(user), json={"name": name, "scopes": scopes})
    assert r.status_code == 201, r.text
    return r.json()


def assert_error(r: requests.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["status"], error["code"]) == (status, code)
    assert error["message"] and error["type"]
    return error


def test_the_openai_client_generates_with_the_persons_style(api_system):
    token = api_system.token("ben")
    style = call(api_system, "GET", "/v1/me/style", token).json()
    client = openai.OpenAI(base_url=f"{api_system.url}/v1", api_key=token, max_retries=0)

    raw = client.images.with_raw_response.generate(
        prompt="a lighthouse", n=2, size="64x64", response_format="b64_json", extra_body={"style_strength": 1.0})
    images = raw.parse()
    assert len(images.data) == 2
    for item in images.data:
        picture = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert picture.size == (64, 64)
        assert (item.style_version, item.style_code) == (style["version"], style["style_code"])
    # The trace id travels in the Kafka headers from the request to its result, and back to the caller.
    trace = raw.headers["trace-id"]
    results = [m for m in clients.read_all(api_system.bootstrap_servers, GENERATION_RESULTS)
               if parse_event(GENERATION_RESULTS, m.value).request_id == images.data[0].request_id]
    assert dict(results[0].headers)["trace-id"].decode() == trace

    by_url = client.images.generate(prompt="a lighthouse", size="64x64")  # response_format url, the default
    fetched = requests.get(by_url.data[0].url, timeout=30)  # a signed URL: no token needed
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert requests.get(by_url.data[0].url.replace("sig=", "sig=0"), timeout=30).status_code == 403

    # Streamed: previews while the worker denoises (decoded from its latents), then the image.
    events = list(client.images.generate(prompt="a lighthouse", size="64x64", stream=True, partial_images=2))
    assert [(e.type, getattr(e, "partial_image_index", None)) for e in events] == [
        ("image_generation.partial_image", 0), ("image_generation.partial_image", 1),
        ("image_generation.completed", None)]
    previews, final = [Image.open(io.BytesIO(base64.b64decode(e.b64_json))) for e in events[:2]], events[2]
    assert all(p.size == (64, 64) for p in previews)
    assert Image.open(io.BytesIO(base64.b64decode(final.b64_json))).tobytes() != previews[1].tobytes()
    two = [e.type for e in client.images.generate(prompt="a lighthouse", n=2, size="64x64", stream=True,
                                                  partial_images=1)]
    assert sorted(two) == ["image_generation.completed"] * 2 + ["image_generation.partial_image"] * 2, two

    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="a lighthouse", size="4096x4096")
    assert bad.value.body["code"] == "invalid_size"


def png(color: tuple[int, int, int], size: tuple[int, int] = (96, 64)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


def test_the_openai_client_makes_clips_in_the_persons_style(api_system):
    token = api_system.token("ben")
    style = call(api_system, "GET", "/v1/me/style", token).json()
    client = openai.OpenAI(base_url=f"{api_system.url}/v1", api_key=token, max_retries=0)
    clip = {"fps": 4, "motion": "pan_right"}  # stylestream's own fields, beside OpenAI's

    # Create, poll, download: an MP4 with the requested frames, in ben's style
    video = client.videos.create(prompt="the sea at dusk", seconds="1", size="64x64", extra_body=clip)
    assert video.status == "queued" and video.progress == 0
    done = client.videos.poll(video.id)
    assert (done.status, done.progress, done.seconds, done.size) == ("completed", 100, "1", "64x64"), done
    assert (done.style_version, done.style_code) == (style["version"], style["style_code"])
    frames = decode_mp4(client.videos.download_content(done.id).read())
    assert len(frames) == 4 and frames[0].shape == (64, 64, 3)

    # ...from a starting image, uploaded or as a data: URL
    started = client.videos.create_and_poll(prompt="the sea at dusk", seconds="0.5", size="64x64", extra_body=clip,
                                            input_reference=("start.png", png((200, 40, 40)), "image/png"))
    assert started.status == "completed" and started.started_from_image, started
    # (OpenAI's client uploads files only; its API's image_url form field, as a data: URL, from a plain form;
    # a 2 MB photo's URL is a larger form field than form parsers take by default)
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (820, 820, 3), np.uint8))
    out = io.BytesIO()
    noisy.save(out, "PNG")
    assert len(out.getvalue()) > 2_000_000
    as_url = "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()
    form = {"prompt": "the sea", "seconds": "0.5", "size": "64x64", "fps": "4", "motion": "pan_right"}
    posted = call(api_system, "POST", "/v1/videos", token, data=form | {"input_reference[image_url]": as_url})
    assert posted.status_code == 200, posted.text
    from_url = client.videos.poll(posted.json()["id"])
    assert from_url.status == "completed" and from_url.started_from_image
    assert len(decode_mp4(client.videos.download_content(from_url.id).read())) == 2

    # Listed newest first, a page at a time
    first = client.videos.list(limit=2)
    assert [v.id for v in first.data] == [from_url.id, started.id] and first.has_more
    assert [v.id for v in client.videos.list(limit=2, after=started.id).data] == [done.id]
    assert [v.id for v in client.videos.list(order="asc", limit=1).data] == [done.id]

    # Beyond the limits, or with a starting image that is no image: the OpenAI error shape, and nothing
    # made or counted (asked through a grant allowed 10 images a minute, which can still make a 10-frame
    # clip afterwards)
    app = openai.OpenAI(base_url=f"{api_system.url}/v1", max_retries=0,
                        api_key=grant(api_system, "ben", ["images:generate"], name="clip app")["token"])
    for kwargs, status, code in [
            ({"seconds": "12"}, 400, "invalid_seconds"),
            ({"seconds": "4", "extra_body": {"fps": 24}}, 400, "invalid_seconds"),  # 96 frames
            ({"extra_body": {"fps": 60}}, 400, "invalid_fps"),
            ({"size": "720x1280"}, 400, "invalid_size"),
            ({"input_reference": ("notes.png", b"not an image", "image/png")}, 400, "invalid_input_reference"),
            ({"input_reference": ("big.png", b"\0" * (4 * 1024 * 1024 + 1), "image/png")}, 413,
             "input_reference_too_large"),
            ({"input_reference": ("photo.jpg", png((1, 2, 3)), "image/jpeg")}, 400, "invalid_input_reference"),
            ({"seconds": "1.5", "extra_body": {"fps": 8}}, 400, "over_limit")]:  # 12 frames, the grant allows 10
        with pytest.raises(openai.APIStatusError) as refused:
            app.videos.create(prompt="the sea", **{"size": "64x64", **kwargs})
        error = refused.value.body
        assert (refused.value.status_code, error["code"]) == (status, code), (kwargs, error)
        assert error["message"] and error["type"] == "invalid_request_error"
    for field, value in (("input_reference[image_url]", "https://192.0.2.1/cat.png"),
                         ("input_reference[image_url]", "data:image/png;base64,not base64!"),
                         ("input_reference[file_id]", "file-1")):
        assert_error(call(api_system, "POST", "/v1/videos", token, data=form | {field: value}), 400,
                     "invalid_input_reference")
    assert len(client.videos.list(limit=100).data) == 3
    assert app.videos.create(prompt="the sea", seconds="1.25", size="64x64", extra_body={"fps": 8}).frames == 10

    # A clip that fails says why, and has no content
    nobody = openai.OpenAI(base_url=f"{api_system.url}/v1", api_key=api_system.token("nobody"), max_retries=0)
    failed = nobody.videos.create_and_poll(prompt="the sea", seconds="0.25", size="64x64")
    assert failed.status == "failed" and "no style vector yet" in failed.error.message
    with pytest.raises(openai.ConflictError) as not_ready:
        nobody.videos.download_content(failed.id)
    assert not_ready.value.body["code"] == "video_not_ready"
    # A clip is not an image: the images route does not serve it
    assert_error(call(api_system, "GET", f"/v1/images/files/{done.id}", token), 404, "not_found")

    # Only its person sees it; deleting it deletes its MP4 and starting image
    cleo = openai.OpenAI(base_url=f"{api_system.url}/v1", api_key=api_system.token("cleo"), max_retries=0)
    with pytest.raises(openai.NotFoundError):
        cleo.videos.retrieve(started.id)
    folder = api_system.root / "images" / "ben"
    assert sorted(p.name for p in folder.glob(f"{started.id}*")) == [
        f"{started.id}-reference.png", f"{started.id}.json", f"{started.id}.mp4"]
    assert client.videos.delete(started.id).deleted
    assert list(folder.glob(f"{started.id}*")) == []
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(started.id)


def test_one_person_cannot_read_use_switch_or_generate_with_anothers_style(api_system):
    ben, cleo = api_system.token("ben"), api_system.token("cleo")
    bens = call(api_system, "GET", "/v1/me/style", ben).json()
    cleos = call(api_system, "GET", "/v1/me/style", cleo).json()
    assert bens["style_code"] != cleos["style_code"]  # each token sees its own subject's style, only

    made = call(api_system, "POST", "/v1/images/generations", ben, json={"prompt": "a cat", "size": "64x64"}).json()
    assert_error(call(api_system, "GET", f"/v1/images/generations/{made['id']}", cleo), 404, "not_found")
    request_id = made["data"][0]["request_id"]
    assert call(api_system, "GET", f"/v1/images/files/{request_id}", ben).status_code == 200
    assert_error(call(api_system, "GET", f"/v1/images/files/{request_id}", cleo), 404, "not_found")
    # OpenAI's `user` names the calling app's own end user: it never selects whose style is used.
    as_ben = call(api_system, "POST", "/v1/images/generations", cleo, json={"prompt": "a cat", "user": "ben"})
    assert as_ben.status_code == 200 and as_ben.json()["data"][0]["style_code"] == cleos["style_code"]

    # A switch always concerns the caller: Cleo's request becomes Cleo's consent event.
    r = call(api_system, "PUT", "/v1/me/style-learning", cleo, json={"scope": "album", "id": "walks", "enabled": False})
    assert r.status_code == 202
    switched = [parse_event(CONSENT_EVENTS, m.value) for m in clients.read_all(api_system.bootstrap_servers,
                                                                              CONSENT_EVENTS)]
    assert [(e.user_id, e.scope_id) for e in switched if e.event_id == r.json()["event_id"]] == [("cleo", "walks")]

    # Grants: scoped to their person; Cleo can neither list nor revoke Ben's.
    reader = grant(api_system, "ben", ["style:read"])
    assert call(api_system, "GET", "/v1/me/style", reader["token"]).json()["style_code"] == bens["style_code"]
    assert_error(call(api_system, "POST", "/v1/images/generations", reader["token"], json={"prompt": "a cat"}),
                 403, "insufficient_scope")
    assert_error(call(api_system, "PUT", "/v1/me/style-learning", reader["token"],
                      json={"scope": "user", "enabled": False}), 403, "insufficient_scope")
    for path in ("/v1/me/grants", "/v1/me/export"):  # the person's own sign-in only
        assert_error(call(api_system, "GET", path, reader["token"]), 403, "insufficient_scope")
    assert reader["id"] not in call(api_system, "GET", "/v1/me/grants", cleo).text
    assert_error(call(api_system, "DELETE", f"/v1/me/grants/{reader['id']}", cleo), 404, "not_found")
    assert call(api_system, "GET", "/v1/me/style", reader["token"]).status_code == 200

    # Revoked: the very next request fails.
    assert call(api_system, "DELETE", f"/v1/me/grants/{reader['id']}", ben).status_code == 200
    assert_error(call(api_system, "GET", "/v1/me/style", reader["token"]), 401, "token_revoked")

    # Expired: a grant whose minute runs out in a second, and a sign-in token past its expiry.
    short, token = new_grant("ben", "brief", ["style:read"], timedelta(minutes=1),
                             now=datetime.now(UTC) - timedelta(seconds=50))
    other_connection = ApiStore(api_system.api.db_path)
    other_connection.add_grant(short)
    other_connection.close()
    assert call(api_system, "GET", "/v1/me/style", token).status_code == 200
    time.sleep(max(0.0, (short.expires_at - datetime.now(UTC)).total_seconds()) + 0.2)
    assert_error(call(api_system, "GET", "/v1/me/style", token), 401, "token_expired")
    assert_error(call(api_system, "GET", "/v1/me", api_system.token("ben", seconds=-1)), 401, "token_expired")

    # Only tokens from the configured issuer's key count.
    stranger = DemoIssuer(api_system.root / "another-issuer").token("ben")
    assert_error(call(api_system, "GET", "/v1/me", stranger), 401, "invalid_token")
    unsigned = ".".join(base64.urlsafe_b64encode(json.dumps(part).encode()).decode().rstrip("=") for part in (
        {"alg": "none", "typ": "JWT"}, {"sub": "ben", "exp": int(time.time()) + 60})) + "."
    assert_error(call(api_system, "GET", "/v1/me", unsigned), 401, "invalid_token")
    assert_error(call(api_system, "GET", "/v1/me", None), 401, "missing_token")

    # Secrets are stored hashed: the database holds the hash, never the token.
    with sqlite3.connect(api_system.api.db_path) as db:
        stored = dict(db.execute("SELECT id, secret_sha256 FROM grants").fetchall())
        dump = "\n".join(db.iterdump())
    secret = reader["token"].split("_", 2)[2]
    assert stored[reader["id"]] == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in dump


def test_limits_answer_in_the_openai_error_shape(api_system):
    token = api_system.token("ben")
    assert_error(call(api_system, "POST", "/v1/images/generations", token,
                      json={"prompt": "x" * 70_000}), 413, "request_too_large")
    chunked = (b'{"prompt": "' + b"x" * 8192 for _ in range(10))  # no Content-Length: counted as it comes
    assert_error(call(api_system, "POST", "/v1/images/generations", token, data=chunked,
                      headers_extra={"Content-Type": "application/json"}), 413, "request_too_large")
    assert call(api_system, "GET", "/healthz", None).json()["status"] == "ok"
    assert_error(call(api_system, "POST", "/v1/images/generations", token, json={"prompt": ""}),
                 400, "invalid_request")
    assert_error(call(api_system, "POST", "/v1/images/generations", token, json={"prompt": "a", "n": 9}),
                 400, "invalid_n")
    app = grant(api_system, "ben", ["images:generate"], name="busy app")  # 10 images a minute per grant
    for _ in range(2):
        r = call(api_system, "POST", "/v1/images/generations", app["token"],
                 json={"prompt": "a", "n": 4, "size": "64x64"})
        assert r.status_code == 200, r.text
    error = assert_error(call(api_system, "POST", "/v1/images/generations", app["token"],
                              json={"prompt": "a", "n": 4}), 429, "rate_limited")
    assert error["type"] == "rate_limit_error" and "grant's limit" in error["message"]


def test_a_message_the_api_cannot_use_is_skipped(api_system):
    # A tombstone whose key is not UTF-8 on a topic the API folds: logged and skipped, nothing stops.
    p = clients.producer(api_system.bootstrap_servers)
    p.send(STYLE_VECTORS, key=b"\xff\xfe", value=None)
    p.send(GENERATION_RESULTS, key=b"ben", value=b"not an event")
    p.flush()
    p.close()
    token = api_system.token("ben")
    made = call(api_system, "POST", "/v1/images/generations", token, json={"prompt": "a kite", "size": "64x64"})
    assert made.status_code == 200, made.text
    assert call(api_system, "GET", "/healthz", None).json() == {"status": "ok", "follower": "ok",
                                                                 "follower_retries": 0}
    # Served in Prometheus' text format without a token (tests/test_broker_faults.py sees it count).
    metrics = call(api_system, "GET", "/metrics", None)
    assert metrics.status_code == 200 and "stylestream_api_follower_failing 0.0" in metrics.text, metrics.text


def test_a_generation_that_times_out_says_so_and_is_fetched_later(api_system, tmp_path):
    # A second API on the same broker that waits for nothing: the running worker still answers.
    cfg = ApiConfig(api_system.bootstrap_servers, tmp_path, api_system.issuer.verifier(), generation_timeout_s=0,
                    images=str(api_system.root / "images"))
    token = api_system.token("ben")
    with ApiServer(create_app(cfg)) as impatient:
        client = openai.OpenAI(base_url=f"{impatient.url}/v1", api_key=token)  # retries 5xx by default...
        with pytest.raises(openai.APIStatusError) as timed_out:
            client.images.generate(prompt="a boat", size="64x64")
        r = timed_out.value.response
        error = assert_error(r, 504, "generation_timeout")
        assert error["type"] == "timeout_error" and error["generation_id"] in error["message"]
        with sqlite3.connect(cfg.db_path) as db:  # ...but not this one: it would be a second generation
            assert db.execute("SELECT count(*) FROM generations").fetchone() == (1,)
        deadline = time.monotonic() + 60
        while (later := requests.get(f"{impatient.url}/v1/images/generations/{error['generation_id']}",
                                     headers={"Authorization": f"Bearer {token}"}, timeout=30).json()
               )["status"] == "pending":
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert later["status"] == "completed" and later["data"][0]["style_version"] >= 1


def test_the_persons_own_endpoints(api_system):
    ana = api_system.token("ana")
    albums = call(api_system, "GET", "/v1/me/albums", ana).json()
    assert [(a["album_id"], a["photo_count"]) for a in albums["albums"]] == [("beach", 4), ("office", 4)]
    photos = call(api_system, "GET", "/v1/me/photos", ana).json()["photos"]
    assert len(photos) == 8 and set(photos[0]) == {"photo_id", "album_id", "uploaded_at", "on_device", "learning"}
    history = call(api_system, "GET", "/v1/me/style/history", ana).json()["versions"]
    assert history and history[-1]["palette"][0].startswith("#")
    explained = call(api_system, "GET", "/v1/me/style/explanation", ana).json()
    assert len(explained["photos"]) == 8 and explained["explanation"]["overall"]
    export = call(api_system, "GET", "/v1/me/export", ana)
    assert "attachment" in export.headers["content-disposition"]
    assert export.json()["style"]["style_code"] == explained["style_code"]


def test_forget_me_through_the_api(api_system):
    eve = api_system.token("eve")
    app = grant(api_system, "eve", ["style:read"])
    assert call(api_system, "GET", "/v1/me/style", app["token"]).status_code == 200
    client = openai.OpenAI(base_url=f"{api_system.url}/v1", api_key=eve, max_retries=0)
    clip = client.videos.create_and_poll(prompt="a walk", seconds="0.25", size="64x64", extra_body={"fps": 8},
                                         input_reference=("me.png", png((90, 160, 90)), "image/png"))
    assert clip.status == "completed"
    images = api_system.root / "images"
    assert {p.name for p in (images / "eve").iterdir()} >= {f"{clip.id}.mp4", f"{clip.id}-reference.png"}
    assert list(audit_files(images, [b"eve"], "generated images", named_by_id=True))  # the audit sees them now
    assert list(audit_files(api_system.root / "api", [b"eve"], "API database"))  # the audit sees her now
    r = call(api_system, "POST", "/v1/me/forget", eve)
    assert r.status_code == 202 and r.json()["request_id"].startswith("forget-")
    deadline = time.monotonic() + 90
    while call(api_system, "GET", "/v1/me/style", eve).status_code != 404:
        assert time.monotonic() < deadline, "ingestion did not erase eve"
        time.sleep(0.5)
    assert call(api_system, "GET", "/v1/me/albums", eve).json()["albums"] == []
    assert_error(call(api_system, "GET", "/v1/me/style", app["token"]), 401, "invalid_token")  # grants go too
    # Nothing of her is left in the API's database file or its write-ahead log, not even in free pages;
    # her clips and their starting images are gone from the image store with the rest of her folder.
    assert list(audit_files(api_system.root / "api", [b"eve"], "API database")) == []
    while (images / "eve").exists():
        assert time.monotonic() < deadline, "the serving worker did not delete eve's images"
        time.sleep(0.5)
    assert list(audit_files(images, [b"eve"], "generated images", named_by_id=True)) == []


def test_images_are_read_only_from_the_image_store(tmp_path):
    store = ImageStore(str(tmp_path / "images"))
    (tmp_path / "images" / "ana").mkdir(parents=True)
    (tmp_path / "images" / "ana" / "r1.png").write_bytes(b"png")
    (tmp_path / "secret.txt").write_text("secret")
    assert store.read(f"file://{tmp_path}/images/ana/r1.png") == b"png"
    for uri in (f"file://{tmp_path}/secret.txt", f"file://{tmp_path}/images/../secret.txt",
                "ftp://192.0.2.1/images/ana/r1.png", "hdfs://namenode/images/ana/r1.png",
                f"{tmp_path}/images-other/x.png", "memory://images/ana/r1.png", f"file://{tmp_path}/images/ana/gone.png"):
        with pytest.raises(NotInStore):
            store.read(uri)


def test_the_published_spec_matches_the_code():
    from typer.testing import CliRunner

    from stylestream.cli.main import app

    result = CliRunner().invoke(app, ["api-spec", "--check"])
    assert result.exit_code == 0, result.output
