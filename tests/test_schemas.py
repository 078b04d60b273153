"""Event contracts: readable validation errors, JSON Schema files in step with the code."""

from __future__ import annotations

import json

import pytest

from stylestream.schemas.events import InvalidEvent, parse_event
from stylestream.schemas.export import JSON_DIR, rendered, stale

GOOD_UPLOAD = {
    "type": "photo_uploaded", "event_id": "e1", "user_id": "ana", "event_time": "2026-01-01T10:00:00Z",
    "photo_id": "p1", "image": {"uri": "file:///x.jpg", "sha256": "a" * 64, "size_bytes": 10},
}


def test_valid_upload_parses():
    e = parse_event("photo-events", json.dumps(GOOD_UPLOAD).encode())
    assert e.photo_id == "p1" and e.effective_taken_at == e.event_time


@pytest.mark.parametrize(("change", "field"), [
    ({"image": {**GOOD_UPLOAD["image"], "sha256": "nothex"}}, "image.sha256"),
    ({"event_time": "2026-01-01T10:00:00"}, "event_time"),  # no time zone
    ({"schema_version": 2}, "schema_version"),
    ({"photo_id": ""}, "photo_id"),
    ({"colour": "red"}, "colour"),  # unknown fields are refused, not dropped
])
def test_validation_error_names_the_field(change, field):
    with pytest.raises(InvalidEvent) as err:
        parse_event("photo-events", json.dumps({**GOOD_UPLOAD, **change}).encode())
    assert str(err.value).startswith(f"photo_uploaded.{field}:") or f".{field}:" in str(err.value)


def test_consent_scope_needs_its_id():
    toggle = {"type": "style_learning_toggled", "event_id": "t", "user_id": "ana",
              "event_time": "2026-01-01T10:00:00+01:00", "scope": "album", "enabled": False}
    with pytest.raises(InvalidEvent, match="scope 'album' needs scope_id"):
        parse_event("consent-events", json.dumps(toggle).encode())
    assert parse_event("consent-events", json.dumps({**toggle, "scope_id": "beach"}).encode()).scope_id == "beach"


def test_json_schema_files_match_the_code():
    assert stale() == [], "run `stylestream schemas export` and commit schemas/json/"
    assert sorted(p.name for p in JSON_DIR.glob("*.schema.json")) == sorted(rendered())
    schema = json.loads((JSON_DIR / "photo-events.schema.json").read_text())
    assert "photo_uploaded" in json.dumps(schema) and "photo_deleted" in json.dumps(schema)
