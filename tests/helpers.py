"""Test helpers for talking to the broker."""

from __future__ import annotations

import numpy as np

from stylestream.schemas.dead_letters import read_dead_letter
from stylestream.schemas.events import StyleVectorUpdated, encode_event, parse_event
from stylestream.streams import clients
from stylestream.streams.topics import INGEST_TOPICS, STYLE_VECTORS, dlq


def produce(bootstrap_servers: str, topic: str, events) -> None:
    # (key, raw bytes) tuples: for malformed input
    clients.send_all(bootstrap_servers, [(topic, *e) if isinstance(e, tuple) else
                                         (topic, e.user_id.encode(), encode_event(e)) for e in events])


def read_topic(bootstrap_servers: str, topic: str) -> list:
    """Every message on the topic, in partition then offset order."""
    return clients.read_all(bootstrap_servers, topic)


def latest_styles(bootstrap: str) -> dict[str, StyleVectorUpdated]:
    """Each user's latest style version; a forgotten user's tombstones clear what came before them."""
    latest = {}
    for m in clients.read_all(bootstrap, STYLE_VECTORS):  # a user's messages are in order on one partition
        if m.value is None:
            latest.pop(m.key.decode(), None)
            continue
        v = parse_event(STYLE_VECTORS, m.value)
        if v.tombstone:
            latest.pop(v.user_id, None)
            continue
        if v.version > getattr(latest.get(v.user_id), "version", 0):
            latest[v.user_id] = v
    return latest


def dead_letters(bootstrap: str) -> dict[tuple[str, int, int], tuple[str, str]]:
    out = {}
    for topic in INGEST_TOPICS:
        for m in clients.read_all(bootstrap, dlq(topic)):
            d = read_dead_letter(m.value)
            out[(d["topic"], d["partition"], d["offset"])] = (d["stage"], d["reason"])
    return out


def style_differences(want: dict[str, StyleVectorUpdated], got: dict[str, StyleVectorUpdated]) -> list[str]:
    """Per user: the last style vector and features (within 1e-6), photo count and facets."""
    # A user seen by one path only must have no photo counted there: a path that met an upload and
    # its deletion in one cycle never published the user, one that met them apart published twice.
    out = [f"{u}: only {'locally' if u in want else 'streamed'}" for u in sorted(set(want) ^ set(got))
           if (want.get(u) or got.get(u)).photo_count > 0]
    for u in sorted(set(want) & set(got)):
        w, g = want[u], got[u]
        if g.photo_count != w.photo_count:
            out.append(f"{u}: {g.photo_count} photos streamed, {w.photo_count} locally")
        elif not (np.allclose(g.embedding, w.embedding, atol=1e-6)
                  and np.allclose(list(g.features.values()), list(w.features.values()), atol=1e-6)):
            out.append(f"{u}: style differs")
        elif [f.photo_count for f in g.facets] != [f.photo_count for f in w.facets] or not all(
                abs(gf.weight_share - wf.weight_share) < 1e-6 and np.allclose(gf.embedding, wf.embedding, atol=1e-6)
                for gf, wf in zip(g.facets, w.facets, strict=True)):
            out.append(f"{u}: facets differ")
    return out


# Values planted in test photos beyond the synthetic library's EXIF (GPS, serial, owner, artist).
PLANTED = {
    "xmp": "XMP-SECRET-Springfield-Home",
    "iptc": "IPTC-SECRET-Byline",
    "makernote": "MAKERNOTE-SECRET-0xBEEF",
    "thumbnail": "THUMBNAIL-SECRET-COMMENT",
}


def plant_private_metadata(jpeg: bytes, taken: str = "2025:06:01 14:30:00") -> bytes:
    """The same JPEG with full private EXIF (the synthetic library's fields, a maker note and an
    embedded thumbnail) and XMP and IPTC segments added."""
    import io

    import piexif
    from PIL import Image

    from stylestream.demo.synthetic import PRIVATE_EXIF

    thumb = io.BytesIO()
    Image.new("RGB", (32, 24), (250, 5, 5)).save(thumb, "JPEG", comment=PLANTED["thumbnail"].encode())
    d, m, s = PRIVATE_EXIF["gps_latitude"]
    exif = {
        "0th": {piexif.ImageIFD.Make: b"SynthCam", piexif.ImageIFD.Artist: PRIVATE_EXIF["artist"].encode(),
                piexif.ImageIFD.Copyright: PRIVATE_EXIF["owner"].encode()},
        "Exif": {piexif.ExifIFD.DateTimeOriginal: taken.encode(), piexif.ExifIFD.FocalLength: (35, 1),
                 piexif.ExifIFD.FNumber: (28, 10), piexif.ExifIFD.ExposureTime: (1, 250),
                 piexif.ExifIFD.ISOSpeedRatings: 200, piexif.ExifIFD.Flash: 0,
                 piexif.ExifIFD.BodySerialNumber: PRIVATE_EXIF["serial"].encode(),
                 piexif.ExifIFD.CameraOwnerName: PRIVATE_EXIF["owner"].encode(),
                 piexif.ExifIFD.MakerNote: PLANTED["makernote"].encode()},
        "GPS": {piexif.GPSIFD.GPSLatitudeRef: b"N",
                piexif.GPSIFD.GPSLatitude: ((int(d), 1), (int(m), 1), (int(s * 1000), 1000))},
        "1st": {piexif.ImageIFD.XResolution: (72, 1), piexif.ImageIFD.YResolution: (72, 1)},
        "thumbnail": thumb.getvalue(),
    }
    out = io.BytesIO()
    piexif.insert(piexif.dump(exif), jpeg, out)
    data = out.getvalue()

    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload

    xmp = (b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF><rdf:Description "
           b"photoshop:City='" + PLANTED["xmp"].encode() + b"'/></rdf:RDF></x:xmpmeta>")
    byline = PLANTED["iptc"].encode()
    iptc = b"\x1c\x02\x50" + len(byline).to_bytes(2, "big") + byline
    iptc = b"Photoshop 3.0\x00" + b"8BIM\x04\x04\x00\x00" + len(iptc).to_bytes(4, "big") + iptc
    return data[:2] + segment(0xE1, xmp) + segment(0xED, iptc) + data[2:]
