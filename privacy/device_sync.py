"""`stylestream device sync`: a person's photos analysed on their own machine, and only what a style
needs of each (its sha256, size, day taken, embedding and named features) sent to the API
(`POST /v1/me/contributions`), a batch at a time.

It reads a library as backfill does (a folder whose first-level folders are albums, or a JSON-lines
manifest) and gives each photo the id backfill would, and computes with ingestion's own decoding,
face masking, features and embedding (transforms/device.py). Before anything is computed it asks the
API for the basis the service computes styles with, and refuses to go on with another; it skips the
photos the service already holds from the device, so an interrupted sync resumes, and a person
forgotten since sends their library again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests

from stylestream.api.auth import PHOTOS_CONTRIBUTE
from stylestream.models.clip import ClipSpec
from stylestream.pipelines.backfill import LibraryItem, library_photo_id, scan, taken_at
from stylestream.schemas.events import DeviceContribution
from stylestream.transforms.device import DevicePhoto, contributions
from stylestream.transforms.embed import OpenClipImageHandler
from stylestream.transforms.manifest import device_basis
from stylestream.transforms.pixels import DecodeLimits

BATCH = 32  # photos decoded, embedded and sent at a time (the API takes up to 100)


class SyncError(RuntimeError):
    """The sync cannot go on; the message says why (what the API answered, or what to fix)."""


@dataclass
class SyncReport:
    total: int = 0
    sent: int = 0
    already: int = 0  # held by the service already
    unusable: dict[str, str] = field(default_factory=dict)  # path -> why


class Api:
    """The calls a sync makes, with the API's own error message when one is refused."""

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

    def contributed(self) -> dict:
        """{"basis": the service's, or None; "photo_ids": the photos it holds from the device}."""
        return self._call("GET", "/v1/me/contributions")

    def contribute(self, batch: list[DeviceContribution]) -> None:
        self._call("POST", "/v1/me/contributions", json={"contributions": [c.model_dump(mode="json") for c in batch]})


def sync(source: Path, api: Api, clip: ClipSpec, limits: DecodeLimits, batch: int = BATCH,
         on_total: Callable[[int], None] = lambda _n: None,
         on_photos: Callable[[int], None] = lambda _n: None) -> SyncReport:
    """Analyse the library's photos the service does not hold yet and send their contributions;
    `on_total(n)` once the library is read, `on_photos(n)` after each batch of n photos."""
    # 1. Who, with what: the token's person, and the service's basis against this machine's
    me = api.me()
    if PHOTOS_CONTRIBUTE not in me["scopes"]:
        raise SyncError(f"this token may not contribute photos (it lacks {PHOTOS_CONTRIBUTE}); use your own "
                        f"sign-in or a grant with {PHOTOS_CONTRIBUTE}")
    held = api.contributed()
    ours = device_basis(clip, limits).model_dump()
    if held["basis"] is not None and held["basis"] != ours:
        differ = ", ".join(f"{k} {held['basis'][k]!r} (here: {ours[k]!r})" for k in ours if held["basis"][k] != ours[k])
        raise SyncError(f"the service computes styles with another basis: {differ}; use its model and weights "
                        "(--clip-model, --clip-pretrained) and its face masking (--mask-faces)")
    # 2. The library, less what the service holds
    user_id, items = me["user_id"], scan(source)
    on_total(len(items))
    report, model_loaded = SyncReport(total=len(items)), None
    held_ids = set(held["photo_ids"])
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        todo = [(item, photo_id) for item in chunk if (photo_id := library_photo_id(user_id, item.key)) not in held_ids]
        report.already += len(chunk) - len(todo)
        if todo:
            # 3. Decoded, masked, measured and embedded here; only the contributions sent
            if model_loaded is None:
                handler = OpenClipImageHandler(clip, device="cpu")
                model_loaded = (handler, handler.load_model())
            made = contributions([_device_photo(item, photo_id) for item, photo_id in todo], clip, limits,
                                 *model_loaded)
            ready = [c for c in made if isinstance(c, DeviceContribution)]
            report.unusable |= {str(item.path): str(m[1]) for (item, _), m in zip(todo, made, strict=True)
                                if not isinstance(m, DeviceContribution)}
            if ready:
                api.contribute(ready)
                report.sent += len(ready)
        on_photos(len(chunk))
    return report


def _device_photo(item: LibraryItem, photo_id: str) -> DevicePhoto:
    return DevicePhoto(photo_id, item.album_id, item.path.read_bytes(), item.taken_at or taken_at(item.path))
