"""Write (or check) the JSON Schema files under schemas/json/, one per topic."""

from __future__ import annotations

import json
from pathlib import Path

from stylestream.schemas.events import json_schemas

JSON_DIR = Path(__file__).parent / "json"


def rendered() -> dict[str, str]:
    """File name -> file text, exactly as `export` writes it."""
    return {
        f"{topic}.schema.json": json.dumps(schema, indent=2, sort_keys=True) + "\n"
        for topic, schema in json_schemas().items()
    }


def export(directory: Path = JSON_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in rendered().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written


def stale(directory: Path = JSON_DIR) -> list[str]:
    """Names of schema files that are missing or differ from the code."""
    return [n for n, t in rendered().items() if not (directory / n).exists() or (directory / n).read_text() != t]
