"""How taste drifts, in SQL over the Parquet history (never the live state database).

`connect(history_dir)` gives an in-memory DuckDB connection with these views and macros, for use
from SQL too (`stylestream drift sql "SELECT * FROM top_drift(now() - INTERVAL 30 DAY, now(), 5)"`):

    history                        every version row (+ `date`, the hive partition)
    history_files                  the same, with each row's `filename`
    user_bucket(user)              which of a closed day's files holds a user ('0'..'f')
    feature_words                  feature, position, word when it rises, word when it falls, step
    style_distance(a, b)           cosine distance of two embeddings (0: same direction)
    versions_of(user)              one row per version of a user (facets aside)
    user_timeline(user)            versions with drift from the first and from the previous version
    user_drift(user, v0, v1)       drift between two versions: distance and per-feature deltas
    in_force                       the in-force snapshots (`date`: the closed day they end)
    in_force_at(t)                 per user: the version in force at t (latest ≤ t) and their first,
                                   each with its date partition: the newest snapshot of a day before
                                   t's plus the rows after it (at most about a snapshot's worth)
    window_ends(t0, t1)            per user: version in force at t0 (NULL if none), first and last ≤ t1,
                                   each with its date partition
    window_pairs(t0, t1)           per user: the version at t0 (or their first after it) and their last ≤ t1
    pair_rows(ends)                those two versions' rows side by side (`ends`: a table of window_pairs)
    changed_ends(t0, t1)           window_pairs of the users who changed in the window
    drift_between(t0, t1)          per user who changed in the window: distance and deltas
    top_drift(t0, t1, n)           the n users who drifted most in the window
    population_drift(t0, t1, thr)  centroid shift and share of users who moved more than thr (everyone
                                   with a style in the window: at its start or first in it, against latest)
    trend_words(deltas)            'warmer and less saturated' (or 'no clear change')

A version's time is when ingestion committed it (`updated_at`). Feature deltas are lists in
`schemas.tables.FEATURE_NAMES` order. A reader that lists files while a compaction swaps them may
see a version twice; every macro here picks one row per (user, version), so nothing counts twice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa

from stylestream.schemas.tables import FEATURE_NAMES

# A closed day's history is one file per bucket of user ids (`analytics.history.write_compacted`,
# `...-users-<bucket>.parquet`), so that `versions_of` reads one person's file of each closed day.
# md5, not DuckDB's hash(): the files on disk must keep their bucket across DuckDB versions.
USER_BUCKET = "CREATE OR REPLACE MACRO user_bucket(u) AS substr(md5(u), 1, 1);"

# The in-force snapshots' folder inside the history folder (kept by analytics/history.py). Not a
# `date=` folder, so the `history` view does not read it; its leading "_" keeps pyarrow's and pandas'
# dataset readers out of it too.
IN_FORCE_DIR = "_in_force"


@dataclass(frozen=True)
class FeatureWord:
    feature: str
    more: str  # the word when the feature rises
    less: str  # ... and when it falls
    step: float  # the smallest change worth a word, in the feature's own units


# A step is about a quarter of how far apart the demo's distinct looks lie on that feature. The
# composition features vary more between photos of one look than between looks: their step is that
# photo-to-photo spread, so a handful of new photos cannot move them across it by chance. Sharpness
# also follows what a photo shows (three stars have more edges than one circle): its step is above
# the drift that a change of subjects alone makes within one look.
FEATURE_WORDS = (
    FeatureWord("warmth", "warmer", "cooler", 0.07),
    FeatureWord("saturation", "more saturated", "less saturated", 0.07),
    FeatureWord("brightness", "brighter", "darker", 0.05),
    FeatureWord("contrast", "more contrasty", "flatter", 0.02),
    FeatureWord("highlights", "more highlights", "fewer highlights", 0.1),
    FeatureWord("shadows", "deeper shadows", "fewer shadows", 0.1),
    FeatureWord("colourfulness", "more colourful", "more muted", 0.07),
    FeatureWord("sharpness", "sharper", "softer", 0.05),
    FeatureWord("thirds_energy", "more off-centre", "more centred", 0.15),
    FeatureWord("symmetry", "more symmetric", "less symmetric", 0.3),
)

MACROS = USER_BUCKET + """
SET TimeZone = 'UTC';
CREATE OR REPLACE MACRO style_distance(a, b) AS list_cosine_distance(a, b);
CREATE OR REPLACE MACRO feature_deltas(a, b) AS [b[i] - a[i] FOR i IN range(1, len(a) + 1)];

-- A closed day's other buckets' files are skipped by name (analytics/history.py `compacted_path`),
-- before DuckDB opens them (LIKE: a regexp_matches() there keeps DuckDB from pruning files).
CREATE OR REPLACE MACRO versions_of(u) AS TABLE
    SELECT DISTINCT ON (version) version, cycle, updated_at, photo_count, total_weight, embedding, features
    FROM history_files
    WHERE user_id = u AND (filename NOT LIKE '%-users-_.parquet'
                           OR filename LIKE '%-users-' || user_bucket(u) || '.parquet')
    ORDER BY version;

CREATE OR REPLACE MACRO user_timeline(u) AS TABLE
    SELECT version, updated_at, photo_count,
           style_distance(first_value(embedding) OVER w, embedding) AS drift_from_first,
           coalesce(style_distance(lag(embedding) OVER w, embedding), 0) AS drift_from_previous,
           features
    FROM versions_of(u) WINDOW w AS (ORDER BY version) ORDER BY version;

CREATE OR REPLACE MACRO user_drift(u, v0, v1) AS TABLE
    SELECT a.version AS from_version, b.version AS to_version, a.updated_at AS from_time,
           b.updated_at AS to_time, style_distance(a.embedding, b.embedding) AS drift,
           feature_deltas(a.features, b.features) AS feature_deltas
    FROM versions_of(u) a, versions_of(u) b WHERE a.version = v0 AND b.version = v1;

-- The newest snapshot of a day before t's, and the history rows after it up to t. The snapshot's day
-- is found at run time; DuckDB's dynamic filters then skip the other snapshot and history files.
CREATE OR REPLACE MACRO in_force_at(t) AS TABLE
    WITH snapshot AS (
        SELECT coalesce(max(date), DATE '0001-01-01') AS day FROM in_force_days WHERE date < CAST(t AS DATE)),
    candidates AS (
        SELECT user_id, version, version_date, updated_at, first_version, first_date FROM in_force
        WHERE date = (SELECT day FROM snapshot)
        UNION ALL
        SELECT user_id, version, date, updated_at, version, date FROM history
        WHERE date > (SELECT day FROM snapshot) AND date <= CAST(t AS DATE) AND updated_at <= t)
    SELECT user_id, max(version) AS version, arg_max(version_date, version) AS version_date,
           arg_max(updated_at, version) AS updated_at, min(first_version) AS first_version,
           arg_min(first_date, first_version) AS first_date
    FROM candidates GROUP BY user_id;

-- Each version's date partition comes along, so fetching embeddings reads only those partitions.
CREATE OR REPLACE MACRO window_ends(t0, t1) AS TABLE
    SELECT e.user_id, s.version AS at_start, s.version_date AS at_start_date,
           e.first_version, e.first_date, e.version AS to_version, e.version_date AS to_date
    FROM in_force_at(t1) e LEFT JOIN in_force_at(least(t0, t1)) s USING (user_id);

-- The embeddings and features of the listed (user_id, from_version, from_date, to_version, to_date)
-- pairs, side by side (one pair per user). Each end is read from its own date partitions, one row per
-- user: a version seen twice (a compaction's swap) is the same row. Not any_value() in a GROUP BY,
-- nor one scan for both ends joined twice: DuckDB moves list columns slowly through those (top-N at
-- 1 M users: 25.5 s and about 10 s, against 7.0 s for this with the two ends joined back to the
-- listed pairs, which it no longer does: at 200 k people, 3.2 s with that join against 3.0 s).
CREATE OR REPLACE MACRO pair_rows(ends) AS TABLE
    WITH starts AS (
        SELECT h.user_id, h.version, h.updated_at, h.embedding, h.features
        FROM history h SEMI JOIN query_table(ends) e
             ON h.user_id = e.user_id AND h.version = e.from_version AND h.date = e.from_date
        WHERE h.date IN (SELECT DISTINCT from_date FROM query_table(ends))
        QUALIFY row_number() OVER (PARTITION BY h.user_id) = 1),
    latest AS (
        SELECT h.user_id, h.version, h.updated_at, h.embedding, h.features
        FROM history h SEMI JOIN query_table(ends) e
             ON h.user_id = e.user_id AND h.version = e.to_version AND h.date = e.to_date
        WHERE h.date IN (SELECT DISTINCT to_date FROM query_table(ends))
        QUALIFY row_number() OVER (PARTITION BY h.user_id) = 1)
    SELECT a.user_id, a.version AS from_version, b.version AS to_version, a.updated_at AS from_time,
           b.updated_at AS to_time, a.embedding AS e0, b.embedding AS e1, a.features AS f0, b.features AS f1
    FROM starts a JOIN latest b ON a.user_id = b.user_id;

-- Each user's version at the window's start (or their first in it, if they appeared during it) and their latest.
CREATE OR REPLACE MACRO window_pairs(t0, t1) AS TABLE
    SELECT user_id, coalesce(at_start, first_version) AS from_version,
           coalesce(at_start_date, first_date) AS from_date, to_version, to_date
    FROM window_ends(t0, t1);

CREATE OR REPLACE MACRO changed_ends(t0, t1) AS TABLE
    SELECT * FROM window_pairs(t0, t1) WHERE to_version > from_version;

CREATE OR REPLACE MACRO drift_between(t0, t1) AS TABLE
    WITH changed AS (SELECT * FROM changed_ends(t0, t1))
    SELECT user_id, from_version, to_version, from_time, to_time, style_distance(e0, e1) AS drift,
           feature_deltas(f0, f1) AS feature_deltas
    FROM pair_rows(changed);

-- Two passes: everyone's drift without their features (which DuckDB then does not read), then the
-- features of the n. At 1 M people (100 M rows): 6.2 s, against 7.1 s for the top n of drift_between
-- over the pair_rows that joined back (README, "The drift history at 100 M rows").
CREATE OR REPLACE MACRO top_drift(t0, t1, n) AS TABLE
    WITH changed AS (SELECT * FROM changed_ends(t0, t1)),
    top AS (SELECT user_id, from_version, to_version, from_time, to_time, style_distance(e0, e1) AS drift
            FROM pair_rows(changed) ORDER BY drift DESC, user_id LIMIT n),
    top_ends AS (SELECT * FROM changed SEMI JOIN top ON changed.user_id = top.user_id)
    SELECT t.user_id, t.from_version, t.to_version, t.from_time, t.to_time, t.drift,
           feature_deltas(p.f0, p.f1) AS feature_deltas
    FROM top t JOIN pair_rows(top_ends) p ON p.user_id = t.user_id ORDER BY t.drift DESC, t.user_id;

CREATE OR REPLACE MACRO population_drift(t0, t1, threshold) AS TABLE
    WITH population_ends AS (SELECT * FROM window_pairs(t0, t1)),
    pairs AS (SELECT * FROM pair_rows(population_ends)),
    embedding_means AS (
        SELECT list(m0 ORDER BY i) AS c0, list(m1 ORDER BY i) AS c1 FROM (
            SELECT i, avg(x0) AS m0, avg(x1) AS m1 FROM (
                SELECT unnest(e0) AS x0, unnest(e1) AS x1, generate_subscripts(e0, 1) AS i FROM pairs)
            GROUP BY i)),
    feature_means AS (
        SELECT list(m0 ORDER BY i) AS g0, list(m1 ORDER BY i) AS g1 FROM (
            SELECT i, avg(x0) AS m0, avg(x1) AS m1 FROM (
                SELECT unnest(f0) AS x0, unnest(f1) AS x1, generate_subscripts(f0, 1) AS i FROM pairs)
            GROUP BY i))
    SELECT (SELECT count(*) FROM pairs) AS users,
           style_distance(c0, c1) AS centroid_shift,
           (SELECT avg(CAST(style_distance(e0, e1) > threshold AS DOUBLE)) FROM pairs) AS share_moved,
           feature_deltas(g0, g1) AS feature_deltas
    FROM embedding_means, feature_means;

CREATE OR REPLACE MACRO join_words(ws) AS CASE
    WHEN len(ws) = 0 THEN 'no clear change'
    WHEN len(ws) = 1 THEN ws[1]
    ELSE array_to_string(ws[1:len(ws) - 1], ', ') || ' and ' || ws[len(ws)] END;

CREATE OR REPLACE MACRO trend_words(deltas) AS join_words(coalesce((
    SELECT list(CASE WHEN deltas[position] > 0 THEN more ELSE less END
                ORDER BY abs(deltas[position]) / step DESC)
    FROM feature_words WHERE abs(deltas[position]) >= step), []));
"""


def connect(history_dir: Path | str, snapshots: bool = True) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the drift views and macros over `history_dir`; without
    `snapshots`, the in-force snapshots are not read (every answer from the history rows alone)."""
    history_dir = Path(history_dir)
    if not any(history_dir.glob("date=*/*.parquet")):
        raise FileNotFoundError(f"no style history under {history_dir} (run ingestion first, or point "
                                "--history at the folder that holds the date=YYYY-MM-DD partitions)")
    db = duckdb.connect()
    db.execute("SET parquet_metadata_cache = true")  # file footers read once per connection, not per query
    db.execute(f"CREATE VIEW history AS SELECT * FROM {_partitions(history_dir)}")
    db.execute(f"CREATE VIEW history_files AS SELECT * FROM {_partitions(history_dir, filename=True)}")
    define_in_force(db, history_dir if snapshots else None)
    db.register("feature_words_arrow", pa.table({
        "feature": [w.feature for w in FEATURE_WORDS],
        "position": [FEATURE_NAMES.index(w.feature) + 1 for w in FEATURE_WORDS],
        "more": [w.more for w in FEATURE_WORDS], "less": [w.less for w in FEATURE_WORDS],
        "step": [w.step for w in FEATURE_WORDS]}))
    db.execute("CREATE TABLE feature_words AS SELECT * FROM feature_words_arrow")
    db.unregister("feature_words_arrow")
    db.execute(MACROS)
    return db


def define_in_force(db: duckdb.DuckDBPyConnection, history_dir: Path | None) -> None:
    """The `in_force` snapshots and `in_force_days`, their days; both empty while there are none (or
    without `history_dir`): define them again once there are."""
    folder = history_dir / IN_FORCE_DIR if history_dir else None
    source = _partitions(folder) if folder and any(folder.glob("date=*/*.parquet")) else _NO_SNAPSHOTS
    db.execute(f"CREATE OR REPLACE VIEW in_force AS SELECT * FROM {source}")
    # The days as the files are at each query, where the view reads them too; else none, as the stand-in.
    days = (f"SELECT DISTINCT CAST(regexp_extract(file, 'date=([0-9-]+)/[^/]*$', 1) AS DATE) AS date "
            f"FROM glob('{_quoted(folder / 'date=*' / '*.parquet')}')" if source != _NO_SNAPSHOTS else
            "SELECT NULL::DATE AS date WHERE false")
    db.execute(f"CREATE OR REPLACE VIEW in_force_days AS {days}")


_NO_SNAPSHOTS = ("(SELECT NULL::VARCHAR AS user_id, NULL::BIGINT AS version, NULL::DATE AS version_date, "
                 "NULL::TIMESTAMPTZ AS updated_at, NULL::BIGINT AS first_version, NULL::DATE AS first_date, "
                 "NULL::DATE AS date WHERE false)")


def _quoted(path: Path) -> str:
    return str(path).replace("'", "''")


def _partitions(folder: Path, filename: bool = False) -> str:
    return (f"read_parquet('{_quoted(folder / 'date=*' / '*.parquet')}', hive_partitioning = true, "
            f"hive_types = {{'date': DATE}}, filename = {str(filename).lower()})")


def timeline(db: duckdb.DuckDBPyConnection, user: str) -> pa.Table:
    return db.sql("SELECT * FROM user_timeline($u)", params={"u": user}).to_arrow_table()


def user_drift(db: duckdb.DuckDBPyConnection, user: str, from_version: int | None = None,
               to_version: int | None = None) -> pa.Table:
    """Drift of one user between two versions (default: the first and the latest), with words."""
    [(first, last)] = db.sql("SELECT min(version), max(version) FROM versions_of($u)", params={"u": user}).fetchall()
    if first is None:
        raise KeyError(f"no versions of user {user!r} in the history")
    return db.sql("SELECT *, trend_words(feature_deltas) AS trend FROM user_drift($u, $a, $b)",
                  params={"u": user, "a": from_version or first, "b": to_version or last}).to_arrow_table()


def user_drift_in_window(db: duckdb.DuckDBPyConnection, user: str, since: datetime, until: datetime) -> pa.Table:
    """Drift of one user from the version in force at `since` (or their first after it) to the latest
    at `until`; no rows if their style did not change in the window."""
    return db.sql("""SELECT from_version, to_version, from_time, to_time, drift, feature_deltas,
                            trend_words(feature_deltas) AS trend
                     FROM drift_between($t0, $t1) WHERE user_id = $u""",
                  params={"u": user, "t0": since, "t1": until}).to_arrow_table()


def top_drift(db: duckdb.DuckDBPyConnection, since: datetime, until: datetime, n: int = 10) -> pa.Table:
    return db.sql("SELECT *, trend_words(feature_deltas) AS trend FROM top_drift($t0, $t1, $n)",
                  params={"t0": since, "t1": until, "n": n}).to_arrow_table()


def population_drift(db: duckdb.DuckDBPyConnection, since: datetime, until: datetime,
                     threshold: float = 0.05) -> pa.Table:
    return db.sql("SELECT *, trend_words(feature_deltas) AS trend FROM population_drift($t0, $t1, $thr)",
                  params={"t0": since, "t1": until, "thr": threshold}).to_arrow_table()


def named_deltas(deltas: list[float] | None) -> dict[str, float]:
    return dict(zip(FEATURE_NAMES, deltas or [], strict=False))


_AGO = re.compile(r"^(\d+(?:\.\d+)?)\s*([dhmw])$")


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """'90d', '12h', '30m', '2w' (that long ago), or an ISO date / date-time (UTC if no zone given)."""
    now = now or datetime.now(UTC)
    if m := _AGO.match(text.strip()):
        unit = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[m[2]]
        return now - timedelta(**{unit: float(m[1])})
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not a time: {text!r} (use e.g. 90d, 12h, 2026-11-01 or 2026-11-01T08:00)") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)
