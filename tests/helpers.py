"""Test helpers for talking to the broker."""

from __future__ import annotations

from stylestream.schemas.events import encode_event
from stylestream.streams import clients


def produce(bootstrap_servers: str, topic: str, events) -> None:
    p = clients.producer(bootstrap_servers)
    for e in events:
        if isinstance(e, tuple):  # (key, raw bytes): for malformed input
            p.send(topic, key=e[0], value=e[1])
        else:
            p.send(topic, key=e.user_id.encode(), value=encode_event(e))
    p.flush()
    p.close()


def read_topic(bootstrap_servers: str, topic: str) -> list:
    """Every message on the topic, in partition then offset order."""
    return clients.read_all(bootstrap_servers, topic)


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
