"""The image store: generated images and clips, their result records, previews and the starting
images clips were asked to begin from, under one fsspec URL, one folder per person.

The serving worker writes it; the HTTP API writes starting images and reads what the worker made.
Everything of a person is in their folder (one path segment under the root), so forgetting them is
deleting it, and nothing outside the root is ever read, whatever a URI names.
"""

from __future__ import annotations

import io
import logging
import posixpath
from urllib.parse import quote

import fsspec
from PIL import Image

log = logging.getLogger(__name__)
REFERENCE_SUFFIX = "-reference.png"  # a clip's starting image: <request id>-reference.png


class NotInStore(LookupError):
    """A URI outside the store, or a file the store no longer holds; the message says which."""


def path_segment(id_: str) -> str:
    """An id as one file-name segment: ids may hold "/" and dots, so "..", "." or "a/../b" must not
    name a folder above or beside the one meant (the folder a forget deletes)."""
    segment = quote(id_, safe="@:_-.")
    return segment.replace(".", "%2E", 1) if segment.startswith(".") else segment


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


class ImageStore:
    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.fs.makedirs(self.root, exist_ok=True)

    def folder(self, user_id: str) -> str:
        return f"{self.root}/{path_segment(user_id)}"

    def path(self, user_id: str, request_id: str, ext: str) -> str:
        return f"{self.folder(user_id)}/{path_segment(request_id)}.{ext}"

    def uri(self, path: str) -> str:
        return self.fs.unstrip_protocol(path)

    def write(self, path: str, data: bytes) -> str:
        """`data` at `path` (in a person's folder); its URI."""
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self.fs.pipe_file(path, data)
        return self.uri(path)

    def read(self, uri: str) -> bytes:
        """A file the store holds, by URI: only under the root, in the store's own protocol."""
        protocol, _ = fsspec.core.split_protocol(uri)
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol)
        path = posixpath.normpath(self.fs._strip_protocol(uri)) if (protocol or "file") in protocols else None
        if path is None or not path.startswith(posixpath.normpath(self.root).rstrip("/") + "/"):
            log.warning("refused to read a file outside %s: %s", self.url, uri)
            raise NotInStore("the file is not in this service's image store")
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            raise NotInStore("the file is no longer stored (its person may be forgotten, or it was deleted)") from None

    def reference_path(self, user_id: str, request_id: str) -> str:
        return f"{self.folder(user_id)}/{path_segment(request_id)}{REFERENCE_SUFFIX}"

    def delete_request(self, user_id: str, request_id: str) -> None:
        """A request's image or clip, its result record, previews and starting image."""
        prefix = f"{self.folder(user_id)}/{path_segment(request_id)}"
        for path in [*self.fs.glob(f"{prefix}.*"), prefix + REFERENCE_SUFFIX]:
            if self.fs.exists(path):
                self.fs.rm(path)

    def forget(self, user_id: str) -> None:
        """Delete everything of a forgotten person (their folder, one path segment under root)."""
        if self.fs.exists(self.folder(user_id)):
            self.fs.rm(self.folder(user_id), recursive=True)
