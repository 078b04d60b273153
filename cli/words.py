"""Numbers and records in words, for what the commands and the demo print."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the command line starts without loading the store
    from stylestream.pipelines.store import CycleResult


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """'1 photo', '3 photos' (`plural` for nouns that do not just take an s)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def cycle_line(r: CycleResult) -> str:
    """What one ingestion cycle did, in one line."""
    return (f"cycle {r.cycle}: {counted(r.events, 'event')}, {counted(r.photos, 'photo')}, "
            f"{counted(r.users_updated, 'user')} updated, {counted(r.dead_letters, 'dead letter')}, lag {r.lag}")
