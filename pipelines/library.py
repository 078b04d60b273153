"""Photo libraries on disk, as backfill and adapter training read them: a folder searched
recursively (its first-level folders are albums or groups), or a JSON-lines manifest whose rows
name a "path" relative to the manifest, with fields of the reader's own."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

from stylestream.transforms.images import LIBRARY_SCHEME

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif")


def register_library(registry: Path, root: Path) -> str:
    """The id of a library folder on this host, recorded in `registry` (JSON: id -> absolute root).
    Events reference photos as library://<id>/<relative path>, so no local path travels in them."""
    root = root.resolve()
    library_id = hashlib.sha256(str(root).encode()).hexdigest()[:16]
    with _changing(registry) as roots:
        roots[library_id] = str(root)
    return library_id


def forget_libraries(registry: Path, library_ids: set[str]) -> None:
    """These libraries leave the registry (their folder paths often name a person)."""
    if library_ids and registry.exists():
        with _changing(registry) as roots:
            for library_id in library_ids:
                roots.pop(library_id, None)


@contextlib.contextmanager
def _changing(registry: Path) -> Iterator[dict[str, str]]:
    """The registry's roots to change in place, written back whole (atomically) if they changed."""
    registry.parent.mkdir(parents=True, exist_ok=True)
    with (registry.with_name(registry.name + ".lock")).open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two backfills registering at once must not lose one
        roots = {}
        with contextlib.suppress(FileNotFoundError):
            roots = json.loads(registry.read_text())
        before = dict(roots)
        yield roots
        if roots != before:
            tmp = registry.with_name(f"{registry.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(roots, indent=2, sort_keys=True))
            tmp.replace(registry)


def library_uri(library_id: str, relative: str) -> str:
    return f"{LIBRARY_SCHEME}{library_id}/{quote(relative)}"


def photo_files(folder: Path) -> list[Path]:
    """Every photo under the folder, in a stable order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)


def manifest_rows(manifest: Path, expected: str) -> list[tuple[Path, dict]]:
    """(resolved path, row) per non-empty line; ValueError naming the line and `expected`
    (the fields, for the message) when a line is not a JSON object with a "path"."""
    rows = []
    for n, line in enumerate(manifest.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append(((manifest.parent / row["path"]).resolve(), row))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{manifest}:{n}: expected {expected}: {e}") from None
    return rows
