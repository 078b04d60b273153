"""Where everything lives under a data directory (`--data-dir`): the one definition every command,
the demo and ingestion use (imported by the command line at start-up: no heavy imports here).

    DATA_DIR/
        state/                 StateLayout: what ingestion keeps (back it up as one)
            state.duckdb       per-user state, offsets, outbox
            history/           the Parquet style history, date=YYYY-MM-DD/cycle-NNNNNNNN.parquet
            analytics.key      the key of the history's pseudonyms (analytics/pseudonyms.py)
            erasure-signing.key  the erasure receipts' signing key
            basis.json         the streaming runners' basis (model, weights, half-life, preprocessing)
            history-writer.duckdb  the history writer's offsets and erasures (streaming runners)
            cycle-plan.json    the cycle in progress
            backfill/          where each backfill stopped
            libraries.json     the folders backfilled photos are read from, by library id
        models/                the tiny models, written on first use
        images/                generated images (serve --output overrides)
        kafka/                 the local broker's log (stylestream broker)
        api/                   stylestream api's own database and keys
        checkpoints/           the Flink job's checkpoints
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

KEY_FILE = "analytics.key"  # the history's pseudonym key (analytics/pseudonyms.py)


@dataclass(frozen=True)
class StateLayout:
    root: Path

    @property
    def db(self) -> Path:
        return self.root / "state.duckdb"

    @property
    def history(self) -> Path:
        return self.root / "history"

    @property
    def analytics_key(self) -> Path:
        return self.root / KEY_FILE

    @property
    def signing_key(self) -> Path:
        """The erasure receipts' Ed25519 signing key (privacy/erasure.py)."""
        return self.root / "erasure-signing.key"

    @property
    def basis(self) -> Path:
        """What the streaming runners' styles are computed from (pipelines/settings.py); the local
        driver keeps its own in the database."""
        return self.root / "basis.json"

    @property
    def history_writer(self) -> Path:
        """The history writer's offsets and erasures (pipelines/history_writer.py)."""
        return self.root / "history-writer.duckdb"

    @property
    def cycle_plan(self) -> Path:
        return self.root / "cycle-plan.json"

    @property
    def backfill(self) -> Path:
        return self.root / "backfill"

    @property
    def libraries(self) -> Path:
        """The backfilled libraries' folders on this host, by id (pipelines/library.py)."""
        return self.root / "libraries.json"

    @classmethod
    def of_history(cls, history: Path) -> StateLayout:
        """The state a history folder belongs to (its analytics key sits beside it)."""
        return cls(history.parent)


@dataclass(frozen=True)
class DataLayout:
    root: Path

    @property
    def state(self) -> StateLayout:
        return StateLayout(self.root / "state")

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def kafka(self) -> Path:
        return self.root / "kafka"

    @property
    def api(self) -> Path:
        return self.root / "api"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"
