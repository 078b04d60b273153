"""`stylestream drift ...` and `stylestream history ...`: analytics over the Parquet history only, so
they work while ingestion runs.

DuckDB and pyarrow are imported inside the functions that use them, as in cli/main.py: every other
`stylestream` command would otherwise pay ~0.5 s for them at start-up.
"""

from __future__ import annotations

import csv
import json
import sys
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from stylestream.cli.options import DEFAULT_DATA_DIR, DataDir, Format, OutputFormat
from stylestream.cli.output import make_console, print_table
from stylestream.cli.words import counted
from stylestream.pipelines.layout import DataLayout, StateLayout

drift_app = typer.Typer(help="How people's taste drifts: tables, CSV/JSON and plots from the style history.",
                        no_args_is_help=True)
history_app = typer.Typer(help="The Parquet style history: layout upkeep.", no_args_is_help=True)
console = make_console()


HistoryDir = Annotated[Path | None, typer.Option(
    "--history", metavar="DIR",
    help="The history folder itself (default: DATA_DIR/state/history), e.g. a synced copy.")]
Since = Annotated[str, typer.Option(metavar="WHEN", help="Window start: 30d, 12h, 2w ago, or an ISO date/time (UTC).")]
Until = Annotated[str, typer.Option(metavar="WHEN", help="Window end, same forms; default now.")]


def _history(data_dir: Path, history_dir: Path | None) -> Path:
    return history_dir or DataLayout(data_dir).state.history


def _connect(data_dir: Path, history_dir: Path | None):
    from stylestream.analytics import drift

    try:
        return drift.connect(_history(data_dir, history_dir))
    except FileNotFoundError as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(1) from None


RawId = Annotated[bool, typer.Option(
    "--raw-id", help="USER is certainly a user id as the photo service knows it (not a pseudonym): fail "
                     "if the analytics key is not at hand.")]
KeyFile = Annotated[Path | None, typer.Option(
    metavar="FILE", help="The analytics key (default: analytics.key beside the history folder).")]


def _history_user(db, typed: str, raw_id: bool, key_file: Path | None, history: Path) -> str:
    """The history's id (a pseudonym, analytics/pseudonyms.py) for the user an operator typed: with
    the analytics key at hand, a user id as the photo service knows it; otherwise a pseudonym."""
    from stylestream.analytics import pseudonyms

    key_path = key_file or StateLayout.of_history(history).analytics_key
    if not key_path.exists():
        if raw_id or not _has_versions(db, typed):
            console.print(f"[red]no versions of {typed!r}[/]: no analytics key at {key_path} to turn a user id "
                          "into the history's pseudonym (give it with --key-file)", soft_wrap=True)
            raise typer.Exit(1)
        return typed
    try:
        mapped = pseudonyms.pseudonym(typed, pseudonyms.load_key(key_path))
    except ValueError as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(1) from None
    return mapped if raw_id or _has_versions(db, mapped) or not _has_versions(db, typed) else typed


def _has_versions(db, user_id: str) -> bool:
    return bool(db.execute("SELECT 1 FROM history WHERE user_id = ? LIMIT 1", [user_id]).fetchall())


def _window(since: str, until: str) -> tuple[datetime, datetime]:
    from stylestream.analytics import drift

    def when(value: str, option: str) -> datetime:
        try:
            return drift.parse_when(value)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint=option) from None
    t0, t1 = when(since, "--since"), when(until, "--until") if until else datetime.now(UTC)
    if t0 >= t1:
        raise typer.BadParameter(f"the window must start before it ends, not {_span(t0, t1)}",
                                 param_hint="--since/--until")
    return t0, t1


def _span(t0: datetime, t1: datetime) -> str:
    return f"from {t0:%Y-%m-%d %H:%M} to {t1:%Y-%m-%d %H:%M} UTC"


def _plot(timeline, user_id: str, path: Path) -> None:
    from stylestream.analytics.plot import plot_timeline  # matplotlib only when a plot is asked for

    console.print(f"plot: {plot_timeline(timeline, user_id, path)}", highlight=False)


def _top_deltas(deltas: list[float] | None, k: int = 3) -> str:
    from stylestream.analytics import drift

    steps = {w.feature: w.step for w in drift.FEATURE_WORDS}
    named = sorted(((n, d) for n, d in drift.named_deltas(deltas).items() if n in steps),
                   key=lambda nd: -abs(nd[1]) / steps[nd[0]])
    return ", ".join(f"{n} {d:+.3f}" for n, d in named[:k])


def _flat(row: dict) -> dict:
    """Lists of feature deltas become one named column each (delta_warmth, ...)."""
    from stylestream.analytics import drift
    from stylestream.schemas.tables import FEATURE_NAMES

    out = {k: v for k, v in row.items() if k not in ("feature_deltas", "features", "facets")}
    out |= {f"delta_{n}": d for n, d in drift.named_deltas(row.get("feature_deltas")).items()}
    out |= {n: v for n, v in zip(FEATURE_NAMES, row.get("features") or [], strict=False)}
    return out


def emit(rows: list[dict], fmt: Format, title: str, columns: dict[str, str]) -> None:
    """rows as a table (the given columns, with headers) or every column as CSV / JSON on stdout."""
    if fmt is Format.json:
        print(json.dumps([_flat(r) for r in rows], default=str, indent=1))
    elif fmt is Format.csv:
        flat = [_flat(r) for r in rows]
        writer = csv.DictWriter(sys.stdout, fieldnames=list(flat[0]) if flat else list(columns))
        writer.writeheader()
        writer.writerows(flat)
    else:
        table = Table(title=title)
        for header in columns.values():
            table.add_column(header)
        for r in rows:
            table.add_row(*(_cell(r, key) for key in columns))
        print_table(console, table)


def _cell(row: dict, key: str) -> str:
    if key == "top_deltas":
        return _top_deltas(row.get("feature_deltas"))
    value = row.get(key)
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, datetime):
        return f"{value:%Y-%m-%d %H:%M}"
    return "" if value is None else str(value)


UserArg = Annotated[str, typer.Argument(metavar="USER", help="The user id as the photo service knows it (with the "
                                                             "analytics key at hand), or the history's pseudonym.")]


@drift_app.command()
def user(
    user_id: UserArg,
    from_version: Annotated[int | None, typer.Option(metavar="N", help="Default: the first version.")] = None,
    to_version: Annotated[int | None, typer.Option(metavar="N", help="Default: the latest version.")] = None,
    since: Annotated[str | None, typer.Option(
        metavar="WHEN", help="Instead of versions, a time window: its start (30d, 12h, "
                             "or an ISO date/time, UTC).")] = None,
    until: Until = "",
    plot: Annotated[Path | None, typer.Option(
        metavar="PNG", help="Also draw the user's timeline to this PNG file.")] = None,
    raw_id: RawId = False, key_file: KeyFile = None,
    fmt: OutputFormat = Format.table, data_dir: DataDir = DEFAULT_DATA_DIR, history_dir: HistoryDir = None,
) -> None:
    """Drift of one user between two versions, or over a time window: distance, the features that
    moved, in words."""
    from stylestream.analytics import drift

    db = _connect(data_dir, history_dir)
    user = _history_user(db, user_id, raw_id, key_file, _history(data_dir, history_dir))
    try:
        if since:
            t0, t1 = _window(since, until)
            rows = drift.user_drift_in_window(db, user, t0, t1).to_pylist()
            missing = f"the style of {user_id} did not change {_span(t0, t1)}"
        else:
            rows = drift.user_drift(db, user, from_version, to_version).to_pylist()
            missing = f"user {user_id} has no version {from_version} or {to_version}"
    except KeyError as e:
        console.print(f"[red]{e.args[0]}[/]")
        raise typer.Exit(1) from None
    if not rows:
        console.print(f"[red]{missing}[/]")
        raise typer.Exit(1)
    emit(rows, fmt, f"Drift of {user_id}", {"from_version": "from", "to_version": "to", "drift": "distance",
                                            "trend": "in words", "top_deltas": "largest changes"})
    if fmt is Format.table:
        r = rows[0]
        console.print(f"{user_id}: {r['trend']} from version {r['from_version']} ({r['from_time']:%Y-%m-%d %H:%M}) "
                      f"to version {r['to_version']} ({r['to_time']:%Y-%m-%d %H:%M} UTC)", highlight=False,
                      soft_wrap=True)
    if plot:
        _plot(drift.timeline(db, user), user_id, plot)


@drift_app.command()
def timeline(
    user_id: UserArg,
    plot: Annotated[Path | None, typer.Option(
        metavar="PNG", help="Draw drift, feature trends and palettes to this PNG.")] = None,
    raw_id: RawId = False, key_file: KeyFile = None,
    fmt: OutputFormat = Format.table, data_dir: DataDir = DEFAULT_DATA_DIR, history_dir: HistoryDir = None,
) -> None:
    """Every version of one user, with its drift from the first and from the previous version."""
    from stylestream.analytics import drift

    db = _connect(data_dir, history_dir)
    table = drift.timeline(db, _history_user(db, user_id, raw_id, key_file, _history(data_dir, history_dir)))
    if table.num_rows == 0:
        console.print(f"[red]no versions of user {user_id!r} in the history[/]")
        raise typer.Exit(1)
    emit(table.to_pylist(), fmt, f"Style versions of {user_id}",
         {"version": "version", "updated_at": "time (UTC)", "photo_count": "photos",
          "drift_from_first": "from first", "drift_from_previous": "from previous"})
    if plot:
        _plot(table, user_id, plot)


@drift_app.command()
def top(
    n: Annotated[int, typer.Option("--limit", "-n", min=1, metavar="N", help="How many users.")] = 10,
    since: Since = "30d", until: Until = "",
    fmt: OutputFormat = Format.table, data_dir: DataDir = DEFAULT_DATA_DIR, history_dir: HistoryDir = None,
) -> None:
    """The users whose style moved most in a window (their version at its start against its end)."""
    from stylestream.analytics import drift

    t0, t1 = _window(since, until)
    rows = drift.top_drift(_connect(data_dir, history_dir), t0, t1, n).to_pylist()
    emit(rows, fmt, f"Top {n} drift, {_span(t0, t1)}",
         {"user_id": "user", "from_version": "from", "to_version": "to", "drift": "distance", "trend": "in words",
          "top_deltas": "largest changes"})


@drift_app.command()
def population(
    threshold: Annotated[float, typer.Option(
        metavar="DISTANCE", help="Cosine distance that counts as 'moved'.")] = 0.05,
    since: Since = "30d", until: Until = "",
    fmt: OutputFormat = Format.table, data_dir: DataDir = DEFAULT_DATA_DIR, history_dir: HistoryDir = None,
) -> None:
    """How everyone's taste moved together: centroid shift and the share of users who moved."""
    from stylestream.analytics import drift

    t0, t1 = _window(since, until)
    rows = drift.population_drift(_connect(data_dir, history_dir), t0, t1, threshold).to_pylist()
    emit(rows, fmt, f"Population drift, {_span(t0, t1)}",
         {"users": "users", "centroid_shift": "centroid shift", "share_moved": f"share moved > {threshold}",
          "trend": "on average", "top_deltas": "largest mean changes"})


@drift_app.command()
def sql(
    query: Annotated[str, typer.Argument(
        metavar="QUERY", help="SQL over the `history` view and the drift macros (see "
                              "analytics/drift.py), e.g. SELECT * FROM user_timeline('ana')")],
    fmt: OutputFormat = Format.table, data_dir: DataDir = DEFAULT_DATA_DIR, history_dir: HistoryDir = None,
) -> None:
    """Run any query with the drift views and macros."""
    import duckdb

    try:
        table = _connect(data_dir, history_dir).sql(query).to_arrow_table()
    except duckdb.Error as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(1) from None
    emit(table.to_pylist(), fmt, "", {c: c for c in table.column_names})


@history_app.command()
def compact(
    before: Annotated[str | None, typer.Option(
        metavar="DATE", help="Compact days before this ISO date (default: today, UTC; "
                             "ingestion may still write today's).")] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR, history_dir: HistoryDir = None,
) -> None:
    """Merge each closed day's cycle files into one file per user bucket, sorted by user (a person's
    timeline then reads one small file a day), and write the in-force snapshots."""
    from stylestream.analytics import history

    folder = _history(data_dir, history_dir)
    if not folder.exists():
        console.print(f"[red]no history at {folder}[/]")
        raise typer.Exit(1)
    try:
        day = date.fromisoformat(before) if before else None
    except ValueError:
        raise typer.BadParameter(f"not a date: {before!r} (use YYYY-MM-DD)") from None
    done = history.compact(folder, day)
    for d, files, rows in done.merged:
        console.print(f"{d}: {files} files -> one per user bucket ({rows} versions)")
    console.print(f"compacted {counted(len(done.merged), 'day')} in {folder}; "
                  f"in-force snapshots written for {counted(len(done.snapshots), 'day')}")
