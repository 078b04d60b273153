"""Faces kept out of a person's style (ingestion's --mask-faces): found with OpenCV's Haar cascade,
which ships inside the opencv-python-headless wheel (no download, no network), and filled with flat
grey, margin included, before the aesthetic features and the embedding see the image."""

from __future__ import annotations

import threading
from functools import cache

import numpy as np
from PIL import Image, ImageDraw

CASCADE = "haarcascade_frontalface_default.xml"
MARGIN = 0.25  # of the face box's side, on every side: hair, ears and chin go too
FILL = (128, 128, 128)
# One cascade per process; detectMultiScale is not documented thread-safe, and OpenCV imported by two
# threads at once leaves one with a half-made module (seen in the Flink job's workers).
_DETECTING = threading.Lock()


@cache
def _cascade():
    import cv2  # here: only ingestion with --mask-faces needs OpenCV

    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + CASCADE)
    if cascade.empty():
        raise RuntimeError(f"cannot load {CASCADE} from {cv2.data.haarcascades}")
    return cascade


def find_faces(image: Image.Image) -> list[tuple[int, int, int, int]]:
    """(x, y, width, height) of each frontal face, in pixels of `image` (RGB)."""
    with _DETECTING:
        import cv2

        gray = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
        smallest = max(20, min(gray.shape) // 16)
        boxes = _cascade().detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(smallest, smallest))
    return sorted(tuple(int(v) for v in box) for box in boxes)


def masked_region(box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The rectangle (left, top, right, bottom) filled for a face box: the box and its margin."""
    x, y, w, h = box
    m = round(MARGIN * max(w, h))
    return x - m, y - m, x + w + m, y + h + m


def mask_faces(image: Image.Image) -> Image.Image:
    """The image with every face found filled; the image itself if there is none."""
    boxes = find_faces(image)
    if not boxes:
        return image
    out = image.copy()
    draw = ImageDraw.Draw(out)
    for box in boxes:
        draw.rectangle(masked_region(box), fill=FILL)
    return out
