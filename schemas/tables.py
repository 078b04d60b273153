"""Arrow schemas of the stored tables: the Parquet style history and dead-letter records."""

from __future__ import annotations

import pyarrow as pa

# The interpretable aesthetic features, in the order they are stored (definitions: transforms/features.py).
FEATURE_NAMES: tuple[str, ...] = (
    "brightness",
    "contrast",
    "highlights",
    "shadows",
    "saturation",
    "warmth",
    "colourfulness",
    "sharpness",
    "lab_a_mean",
    "lab_b_mean",
    "lab_a_spread",
    "lab_b_spread",
    "thirds_energy",
    "symmetry",
    *(f"palette{i}_{c}" for i in (1, 2, 3) for c in ("l", "a", "b")),
)

FACET = pa.struct([
    pa.field("photo_count", pa.int64()),
    pa.field("total_weight", pa.float64()),
    pa.field("embedding", pa.list_(pa.float32())),
    pa.field("features", pa.list_(pa.float32())),
])

# One row per immutable version of a user's style. Written once per committed ingestion cycle, as
# history/date=<UTC day>/cycle-<n>.parquet (layout, compaction and redaction: analytics/history.py);
# the file of a cycle exists only if that cycle committed.
STYLE_HISTORY = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("version", pa.int64(), nullable=False),  # 1, 2, ... per user
        pa.field("cycle", pa.int64(), nullable=False),  # the ingestion cycle that committed it
        pa.field("updated_at", pa.timestamp("us", tz="UTC"), nullable=False),  # when it committed
        pa.field("photo_count", pa.int64(), nullable=False),  # photos counted in it
        pa.field("total_weight", pa.float64(), nullable=False),  # their summed time-decay weights
        pa.field("embedding", pa.list_(pa.float32()), nullable=False),  # weighted mean image embedding
        pa.field("features", pa.list_(pa.float32()), nullable=False),  # weighted mean, FEATURE_NAMES order
        pa.field("facets", pa.list_(FACET), nullable=False),  # up to 3 distinct tastes in the library
        pa.field("tombstone", pa.bool_(), nullable=False),  # the user's style was erased
    ],
    metadata={"feature_names": ",".join(FEATURE_NAMES)},
)

# Each person's version in force at the end of a closed day (their latest committed by then) and their
# first, beside the history as history/_in_force/date=<day>/in-force.parquet. Derived from the history
# alone (analytics/history.py keeps it in step): a window's drift reads two of these, not every row.
IN_FORCE = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("version", pa.int64(), nullable=False),
        pa.field("version_date", pa.date32(), nullable=False),  # the history partition that holds it
        pa.field("updated_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("first_version", pa.int64(), nullable=False),
        pa.field("first_date", pa.date32(), nullable=False),
    ]
)
