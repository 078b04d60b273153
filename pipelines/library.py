"""Photo libraries on disk, as backfill and adapter training read them: a folder searched
recursively (its first-level folders are albums or groups), or a JSON-lines manifest whose rows
name a "path" relative to the manifest, with fields of the reader's own."""

from __future__ import annotations

import json
from pathlib import Path

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif")


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
