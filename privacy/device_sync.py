"""`stylestream device sync`: a person's photos analysed on their own machine, and only what a style
needs of each (its sha256, size, day taken, embedding and named features) sent to the API
(`POST /v1/me/contributions`), a batch at a time.

It reads a library as backfill does (a folder whose first-level folders are albums, or a JSON-lines
manifest) and gives each photo the id backfill would, computes with ingestion's own decoding, face
masking, features and embedding (transforms/device.py), and keeps a ledger of what the API accepted
(photo id -> sha256), so an interrupted sync resumes and a photo already sent is not sent again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests

from stylestream.models.clip import ClipSpec
from stylestream.pipelines.backfill import LibraryItem, library_photo_id, scan, taken_at
from stylestream.schemas.events import DeviceContribution
from stylestream.transforms.device import DevicePhoto, contributions
from stylestream.transforms.embed import OpenClipImageHandler
from stylestream.transforms.pixels import DecodeLimits

CONTRIBUTE = "photos:contribute"
BATCH = 32  # photos decoded, embedded and sent at a time (the API takes up to 100)


class SyncError(RuntimeError):
    """The sync cannot go on; the message says why (what the API answered, or what to fix)."""


@dataclass
class SyncReport:
    total: int = 0
    sent: int = 0
    already: int = 0  # sent by an earlier run, unchanged since
    unusable: dict[str, str] = field(default_factory=dict)  # path -> why


class Ledger:
    """What the API has accepted from this library for this person: photo id -> sha256 of the file."""

    def __init__(self, path: Path):
        self.path = path
        self.sent: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}

    def record(self, accepted: list[DeviceContribution]) -> None:
        self.sent |= {c.photo_id: c.sha256 for c in accepted}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.sent, indent=0, sort_keys=True))
        tmp.replace(self.path)  # a sync stopped midway keeps every batch the API accepted


def default_ledger(api: str, user_id: str, source: Path) -> Path:
    """One ledger per API, person and library, under the user's cache folder."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stylestream" / "device"
    key = hashlib.sha256(f"{api}\0{user_id}\0{source.resolve()}".encode()).hexdigest()[:24]
    return cache / f"{key}.json"


class Api:
    """The two calls a sync makes, with the API's own error message when one is refused."""

    def __init__(self, url: str, token: str, session: requests.Session | None = None):
        self.url = url.rstrip("/")
        self.session = session or requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"

    def _call(self, method: str, path: str, **kw) -> dict:
        try:
            r = self.session.request(method, f"{self.url}{path}", timeout=60, **kw)
        except requests.RequestException as e:
            raise SyncError(f"cannot reach {self.url}: {type(e).__name__}: {e}") from None
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:200]
            raise SyncError(f"{method} {path} answered {r.status_code}: {message}")
        return r.json()

    def me(self) -> dict:
        return self._call("GET", "/v1/me")

    def contribute(self, batch: list[DeviceContribution]) -> None:
        self._call("POST", "/v1/me/contributions", json={"contributions": [c.model_dump(mode="json") for c in batch]})


def sync(source: Path, api: Api, clip: ClipSpec, limits: DecodeLimits, ledger: Path | None = None,
         batch: int = BATCH, on_photos: Callable[[int], None] = lambda _n: None) -> SyncReport:
    """Analyse the library's photos not yet accepted and send their contributions; `on_photos(n)` after
    each batch of n photos."""
    me = api.me()
    if CONTRIBUTE not in me["scopes"]:
        raise SyncError(f"this token may not contribute photos (it lacks {CONTRIBUTE}); use your own sign-in "
                        f"or a grant with {CONTRIBUTE}")
    user_id, items = me["user_id"], scan(source)
    kept = Ledger(ledger or default_ledger(api.url, user_id, source))
    handler = OpenClipImageHandler(clip, device="cpu")
    model = handler.load_model()
    report = SyncReport(total=len(items))
    for start in range(0, len(items), batch):
        photos = [_device_photo(item, user_id) for item in items[start:start + batch]]
        todo = [p for p in photos if kept.sent.get(p.photo_id) != hashlib.sha256(p.data).hexdigest()]
        report.already += len(photos) - len(todo)
        made = contributions(todo, clip, limits, handler, model)
        ready = [c for c in made if isinstance(c, DeviceContribution)]
        report.unusable |= {str(items[start + photos.index(p)].path): str(e) for p, e in
                            (m for m in made if not isinstance(m, DeviceContribution))}
        if ready:
            api.contribute(ready)
            kept.record(ready)
            report.sent += len(ready)
        on_photos(len(photos))
    return report


def _device_photo(item: LibraryItem, user_id: str) -> DevicePhoto:
    return DevicePhoto(library_photo_id(user_id, item.key), item.album_id, item.path.read_bytes(),
                       item.taken_at or taken_at(item.path))
