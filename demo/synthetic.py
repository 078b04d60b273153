"""A synthetic photo library: users whose photos share a recognisable look, as real JPEG files.

Each look is a family of colour, contrast and texture choices. What a photo shows is a `Scene`
drawn independently of the look: one to three of eight subjects (circle, square, triangle, star,
cross, ring, house, tree) on the left, in the centre or on the right, with a caption that says so ("two
stars on the left"). A person's photos may show any subject or mostly one, so a style model can
learn the look, the subject matter, or both, and a text model the words for them. The files carry
camera-like EXIF, including private fields (GPS, serial number, owner, artist) that the pipeline
must never let through.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from stylestream.schemas import events
from stylestream.schemas.events import ImageRef, PhotoDeleted, PhotoUploaded, StyleLearningToggled
from stylestream.streams import topics


@dataclass(frozen=True)
class Look:
    name: str
    description: str
    hues: tuple[float, float]  # hue range, degrees
    saturation: tuple[float, float]
    value: tuple[float, float]
    blur: float = 0.0
    monochrome: bool = False


LOOKS = {
    "warm": Look("warm", "warm and saturated", (0, 45), (0.65, 1.0), (0.6, 1.0)),
    "cool": Look("cool", "cool and muted", (180, 240), (0.1, 0.35), (0.35, 0.7), blur=1.5),
    "mono": Look("mono", "high-contrast monochrome", (0, 360), (0.0, 0.0), (0.0, 1.0), monochrome=True),
    "pastel": Look("pastel", "light pastel", (280, 360), (0.12, 0.3), (0.85, 1.0)),
    "moody": Look("moody", "dark and moody", (150, 200), (0.2, 0.5), (0.05, 0.35), blur=0.8),
    "green": Look("green", "vivid greens", (80, 140), (0.6, 0.95), (0.4, 0.8)),
}

# Values planted in every photo's EXIF; none of them may appear in anything the pipeline stores.
PRIVATE_EXIF = {
    "artist": "Jane Q. Private",
    "owner": "Owner Name Secret",
    "serial": "SN-SECRET-0042",
    "gps_latitude": (52.0, 31.0, 12.345),
}


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((h % 360) / 360, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


SUBJECTS = ("circle", "square", "triangle", "star", "cross", "ring", "house", "tree")
POSITIONS = ("left", "centre", "right")  # columns of the square a centre crop keeps
COUNTS = (1, 2, 3)
_COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
_WHERE = {"left": "on the left", "centre": "in the centre", "right": "on the right"}
_PLURALS = {"cross": "crosses"}


@dataclass(frozen=True)
class Scene:
    """What a photo shows, independent of its look: `count` of one subject, stacked in one column."""

    subject: str
    count: int
    position: str

    @property
    def caption(self) -> str:
        noun = self.subject if self.count == 1 else _PLURALS.get(self.subject, f"{self.subject}s")
        return f"{_COUNT_WORDS[self.count]} {noun} {_WHERE[self.position]}"

    @property
    def labels(self) -> dict[str, str | int]:
        return {"subject": self.subject, "count": self.count, "position": self.position}


def every_scene() -> list[Scene]:
    """Every scene a photo can show, in a fixed order."""
    return [Scene(s, c, p) for s in SUBJECTS for c in COUNTS for p in POSITIONS]


def random_scene(seed: int, subjects: tuple[str, ...] = SUBJECTS) -> Scene:
    """The scene `render(look, seed)` draws unless given one."""
    rng = np.random.default_rng([seed, 1])  # apart from the look's colours, which use `seed` alone
    count = int(rng.integers(COUNTS[0], COUNTS[-1] + 1))
    return Scene(str(rng.choice(subjects)), count, str(rng.choice(POSITIONS)))


def _draw_subject(draw: ImageDraw.ImageDraw, subject: str, cx: float, cy: float, r: float,
                  fill: tuple[int, int, int]) -> None:
    """One subject centred on (cx, cy), about 2r across."""
    if subject == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif subject == "square":
        draw.rectangle((cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r), fill=fill)
    elif subject == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    elif subject == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.42 * r)
        draw.polygon([(cx + q * np.cos(a), cy - q * np.sin(a)) for q, a in zip(radii, angles, strict=True)], fill=fill)
    elif subject == "cross":
        t = 0.3 * r
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
    elif subject == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(1, round(0.3 * r)))
    elif subject == "house":
        draw.rectangle((cx - 0.7 * r, cy - 0.1 * r, cx + 0.7 * r, cy + r), fill=fill)
        draw.polygon([(cx, cy - r), (cx + 0.95 * r, cy - 0.1 * r), (cx - 0.95 * r, cy - 0.1 * r)], fill=fill)
    elif subject == "tree":
        draw.rectangle((cx - 0.15 * r, cy + 0.2 * r, cx + 0.15 * r, cy + r), fill=fill)
        draw.ellipse((cx - 0.65 * r, cy - r, cx + 0.65 * r, cy + 0.35 * r), fill=fill)
    else:
        raise ValueError(f"unknown subject {subject!r}; one of {', '.join(SUBJECTS)}")


def render(look: Look, seed: int, size: tuple[int, int] = (320, 240), scene: Scene | None = None) -> Image.Image:
    """One photo in `look` showing `scene` (by default `random_scene(seed)`): a gradient sky, a few
    faint blobs, and the subject, all in colours the look decides. The sky takes the bright end of the
    look's range and the subject the dark end, so the subject shows in every look."""
    scene = scene or random_scene(seed)
    rng = np.random.default_rng(seed)
    lo, hi = look.value

    def colour(value: tuple[float, float]) -> tuple[int, int, int]:
        v = rng.uniform(*value)
        if look.monochrome:
            return _hsv_to_rgb(0, 0, 0.15 * v if v < 0.5 else 0.85 + 0.15 * v)  # crushed to black or white
        return _hsv_to_rgb(rng.uniform(*look.hues), rng.uniform(*look.saturation), v)

    # Always the same way round: a look whose photos were now light, now dark would be two looks.
    sky, thing = (hi - 0.4 * (hi - lo), hi), (lo, lo + 0.3 * (hi - lo))
    w, h = size
    top, bottom = np.array(colour(sky), float), np.array(colour(sky), float)
    t = np.linspace(0, 1, h)[:, None, None]
    img = Image.fromarray(np.broadcast_to(top * (1 - t) + bottom * t, (h, w, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 5))):  # faint texture in the sky's own colours: not a subject
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(0.05, 0.2) * w, rng.uniform(0.05, 0.2) * h
        faint = 0.35 * np.array(colour(sky)) + 0.65 * (top + bottom) / 2
        draw.ellipse((x0 - rx, y0 - ry, x0 + rx, y0 + ry), fill=tuple(int(c) for c in faint))
    # The subject: `count` of them stacked in a column of the centred square (what a centre crop keeps),
    # at a quarter, half or three quarters of its width: as large as the column allows, since the
    # models that learn them see the square at 64 px.
    side = min(w, h)
    left = (w - side) / 2
    column = left + side * (POSITIONS.index(scene.position) + 1) / 4
    r = side / (2 * scene.count + 1) * rng.uniform(0.85, 1.0)
    r = min(r, side * (1 / 4 - 0.04))  # with the jitter below, never over the square's edge
    fill = colour(thing)
    for i in range(scene.count):
        cy = (h - side) / 2 + side * (i + 0.5) / scene.count + rng.uniform(-0.05, 0.05) * side / scene.count
        cx = column + rng.uniform(-0.03, 0.03) * side
        _draw_subject(draw, scene.subject, cx, cy, r, fill)
    if look.blur:
        img = img.filter(ImageFilter.GaussianBlur(look.blur * min(1.0, side / 240)))
    noise = rng.normal(0, 4, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img, float) + noise, 0, 255).astype(np.uint8))


def exif_with_private_fields(taken_at: datetime) -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "SynthCam"  # Make
    exif[0x0110] = "SC-1"  # Model
    exif[0x013B] = PRIVATE_EXIF["artist"]  # Artist
    exif[0x8298] = PRIVATE_EXIF["owner"]  # Copyright (owner)
    sub = exif.get_ifd(0x8769)
    sub[0x9003] = taken_at.strftime("%Y:%m:%d %H:%M:%S")  # DateTimeOriginal
    sub[0x920A] = 35.0  # FocalLength
    sub[0x829D] = 2.8  # FNumber
    sub[0x829A] = 0.004  # ExposureTime
    sub[0x8827] = 200  # ISO
    sub[0x9209] = 0  # Flash
    sub[0xA431] = PRIVATE_EXIF["serial"]  # BodySerialNumber
    sub[0xA430] = PRIVATE_EXIF["owner"]  # CameraOwnerName
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2] = "N", PRIVATE_EXIF["gps_latitude"]
    gps[3], gps[4] = "E", (13.0, 24.0, 1.0)
    return exif


@dataclass(frozen=True)
class SyntheticPhoto:
    user_id: str
    photo_id: str
    album_id: str
    look: str
    path: Path
    taken_at: datetime
    scene: Scene | None = None  # what it shows (None: not a rendered scene)

    def upload_event(self, event_time: datetime | None = None) -> PhotoUploaded:
        data = self.path.read_bytes()
        return PhotoUploaded(
            event_id=f"up-{self.photo_id}", user_id=self.user_id, event_time=event_time or self.taken_at,
            photo_id=self.photo_id, album_id=self.album_id, taken_at=self.taken_at,
            image=ImageRef(uri=self.path.resolve().as_uri(), sha256=hashlib.sha256(data).hexdigest(),
                           size_bytes=len(data)))

    def delete_event(self, event_time: datetime) -> PhotoDeleted:
        return PhotoDeleted(event_id=f"del-{self.photo_id}", user_id=self.user_id, event_time=event_time,
                            photo_id=self.photo_id)


def toggle_event(user_id: str, scope: str, scope_id: str | None, enabled: bool, event_time: datetime,
                 event_id: str | None = None) -> StyleLearningToggled:
    return StyleLearningToggled(
        event_id=event_id or f"tog-{user_id}-{scope}-{scope_id}-{int(event_time.timestamp())}-{int(enabled)}",
        user_id=user_id, event_time=event_time, scope=scope, scope_id=scope_id, enabled=enabled)


Album = tuple[str, str, int] | tuple[str, str, int, tuple[str, ...]]


def make_library(root: Path, users: dict[str, list[Album]], seed: int = 0,
                 start: datetime = datetime(2025, 6, 1, 9, tzinfo=UTC)) -> list[SyntheticPhoto]:
    """Write JPEGs for `users`: user_id -> [(album_id, look name, photo count[, subjects]), ...]; an
    album's photos show any of SUBJECTS, or only the subjects it names (a person who photographs
    mostly one kind of thing)."""
    photos = []
    for ui, (user_id, albums) in enumerate(sorted(users.items())):
        n = 0
        for album_id, look_name, count, *subjects in albums:
            for _ in range(count):
                photo_id = f"{user_id}-p{n:04d}"
                taken = start + timedelta(days=n * 3, hours=(n * 7) % 12)
                path = root / user_id / f"{photo_id}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                photo_seed = seed * 1_000_003 + ui * 10_007 + n
                scene = random_scene(photo_seed, *subjects)
                img = render(LOOKS[look_name], photo_seed, scene=scene)
                img.save(path, "JPEG", quality=90, exif=exif_with_private_fields(taken))
                photos.append(SyntheticPhoto(user_id, photo_id, album_id, look_name, path, taken, scene))
                n += 1
    return photos


FORGET_AFTER_MIN = 500_000  # the messy stream's events are dated within this many minutes of its start


def messy_stream(root: Path, n_events: int, users: int, seed: int,
                 forget_share: float = 0.0) -> list[tuple[str, bytes, bytes]]:
    """A stream a photo service might send: uploads, duplicate deliveries, deletions, album, photo and
    whole-user opt-outs and opt-ins, event times in no particular order, some malformed events and,
    with `forget_share`, requests to forget a person, as (topic, key, value) in production order.
    Its photos are few small JPEGs under `root`."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(64):  # many photos share these few files: decoding is not what is tested here
        path = root / f"img{i}.jpg"
        render(LOOKS[sorted(LOOKS)[i % len(LOOKS)]], seed * 100 + i, (96, 72)).save(path, "JPEG", quality=85)
        images.append(path)
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    stream, uploaded = [], []
    n = 0
    while len(stream) < n_events:
        n += 1
        user = f"u{rng.randrange(users):04d}"
        album = f"{user}-a{rng.randrange(3)}"
        when = t0 + timedelta(minutes=rng.randrange(FORGET_AFTER_MIN))  # event times in no particular order
        r = rng.random()
        if r < 0.62 or not uploaded:
            p = SyntheticPhoto(user, f"{user}-p{n}", album, "", images[rng.randrange(len(images))], when)
            uploaded.append(p)
            stream.append((topics.PHOTO_EVENTS, user, events.encode_event(p.upload_event(when))))
        elif r < 0.72:  # a duplicate delivery of an earlier event
            stream.append(stream[rng.randrange(len(stream))])
            continue
        elif r < 0.79:
            p = rng.choice(uploaded)
            stream.append((topics.PHOTO_EVENTS, p.user_id, events.encode_event(p.delete_event(when))))
        elif r < 0.90:
            stream.append((topics.CONSENT_EVENTS, user, events.encode_event(
                toggle_event(user, "album", album, rng.random() < 0.5, when, event_id=f"t{n}"))))
        elif r < 0.955:
            p = rng.choice(uploaded)
            stream.append((topics.CONSENT_EVENTS, p.user_id, events.encode_event(
                toggle_event(p.user_id, "photo", p.photo_id, rng.random() < 0.4, when, event_id=f"t{n}"))))
        elif r < 0.97:  # the whole user off or on
            stream.append((topics.CONSENT_EVENTS, user, events.encode_event(
                toggle_event(user, "user", None, rng.random() < 0.6, when, event_id=f"t{n}"))))
        elif r < 0.97 + forget_share:
            # Asked after every photo the stream dates: what the person sends later, in any order, is
            # void, whichever topic a runner reads first.
            stream.append((topics.CONSENT_EVENTS, user, events.encode_event(events.UserForgotten(
                event_id=f"forget-{n}", user_id=user, event_time=t0 + timedelta(minutes=FORGET_AFTER_MIN + n)))))
        else:
            stream.append((topics.PHOTO_EVENTS, user, b'{"type": "photo_uploaded", "broken": ' + str(n).encode()))
    return [(t, k.encode() if isinstance(k, str) else k, v) for t, k, v in stream]


def forgotten_for_good(stream: list[tuple[str, bytes, bytes]]) -> set[str]:
    """People whose last message in `stream` (a repeated delivery aside) asks to forget them: nothing of
    them may be left anywhere once it is ingested."""
    last, seen = {}, set()
    for m in stream:
        if m not in seen:
            seen.add(m)
            last[m[1].decode()] = m[0] == topics.CONSENT_EVENTS and b"user_forgotten" in m[2]
    return {u for u, forgot in last.items() if forgot}
