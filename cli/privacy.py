"""The privacy commands: `forget`, `receipt ...`, `style manifest|explain|export`, `verify`, `audit`.

Heavy libraries (models, DuckDB, the accountant) are imported inside the commands that use them, as in
cli/main.py, so that every other command starts fast.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from stylestream.cli.options import DEFAULT_DATA_DIR, BootstrapServers, DataDir, Format, OutputFormat
from stylestream.cli.output import make_console, print_table
from stylestream.cli.words import counted
from stylestream.defaults import TINY_CLIP
from stylestream.pipelines.layout import DataLayout
from stylestream.streams import clients

console = make_console()
style_app = typer.Typer(help="A person's style: what it was computed from, what shaped it, releasing it.",
                        no_args_is_help=True)
receipt_app = typer.Typer(help="Erasure receipts: fetch one, check its signature, show the public key.",
                          no_args_is_help=True)
User = Annotated[str, typer.Argument(metavar="USER_ID", help="The person's user id.")]
ClipModel = Annotated[str, typer.Option(metavar="NAME", help="open_clip architecture ingestion used.")]
ClipPretrained = Annotated[str | None, typer.Option(
    metavar="TAG|FILE", help="Its pretrained tag or checkpoint (required for any model but the tiny default).")]


def _latest(bootstrap_servers: str, topic: str, key: bytes) -> bytes | None:
    """The latest value under `key` on a topic keyed by user (None: none, or a tombstone)."""
    clients.require_broker(bootstrap_servers)
    value = None
    for m in clients.read_all(bootstrap_servers, topic):
        if m.key == key:
            value = m.value
    return value


def _manifest_of(bootstrap_servers: str, user_id: str):
    from stylestream.schemas.events import StyleManifest
    from stylestream.streams.topics import STYLE_MANIFESTS

    raw = _latest(bootstrap_servers, STYLE_MANIFESTS, user_id.encode())
    if raw is None:
        console.print(f"[red]no style manifest for {user_id}[/] (no style yet, or forgotten)", soft_wrap=True)
        raise typer.Exit(1)
    return StyleManifest.model_validate_json(raw)


@style_app.command("manifest")
def style_manifest(user_id: User, bootstrap_servers: BootstrapServers,
                   output: Annotated[Path | None, typer.Option(
                       "--output", "-o", dir_okay=False, metavar="FILE",
                       help="Write it here (default: print it).")] = None) -> None:
    """The manifest of a person's latest style version: its style code, the photos that count (id,
    sha256, weight), the model and settings; give it to `stylestream verify`."""
    manifest = _manifest_of(bootstrap_servers, user_id)
    text = manifest.model_dump_json(indent=2)
    if output is None:
        print(text)
        return
    output.write_text(text + "\n")
    console.print(f"version {manifest.version}, style code {manifest.style_code}, "
                  f"{counted(len(manifest.photos), 'photo')}: wrote {output}", soft_wrap=True)


@style_app.command("explain")
def style_explain(user_id: User, bootstrap_servers: BootstrapServers, fmt: OutputFormat = Format.table) -> None:
    """What shaped a person's latest style: per named feature the photos raising and lowering it most,
    per facet its most typical photos (photo ids and albums, never pixels)."""
    from stylestream.cli.drift import emit

    manifest = _manifest_of(bootstrap_servers, user_id)
    ex = manifest.explanation
    rows = [{"part": "overall", "direction": "typical", **p.model_dump()} for p in ex.overall]
    for i, facet in enumerate(ex.facets):
        rows += [{"part": f"facet {i} ({counted(facet.photo_count, 'photo')})", "direction": "typical",
                  **p.model_dump()} for p in facet.typical]
    for name, pulls in ex.features.items():
        rows += [{"part": name, "direction": "raises", **p.model_dump()} for p in pulls.raises]
        rows += [{"part": name, "direction": "lowers", **p.model_dump()} for p in pulls.lowers]
    emit(rows, fmt, f"What shaped {user_id}'s style, version {manifest.version} ({manifest.style_code})",
         {"part": "part", "direction": "", "photo_id": "photo", "album_id": "album", "pull": "pull"})


@style_app.command("export")
def style_export(
    user_id: User, bootstrap_servers: BootstrapServers, data_dir: DataDir = DEFAULT_DATA_DIR,
    epsilon: Annotated[float, typer.Option(min=0.01, metavar="EPS",
                                           help="Privacy loss of this release (Gaussian mechanism).")] = 1.0,
    budget: Annotated[float, typer.Option(min=0.01, metavar="EPS",
                                          help="Each person's total epsilon over all releases.")] = 4.0,
    output: Annotated[Path | None, typer.Option("--output", "-o", dir_okay=False, metavar="FILE")] = None,
) -> None:
    """Release a person's latest style vector with Gaussian noise, charged to their privacy budget.

    The sensitivity is what one photo can change of the normalized mean (computed from the person's
    photos, not released); the budget is composed over every release to the person with
    dp-accounting's RDP accountant at delta 1e-6, and a release that would exceed it is refused."""
    from stylestream.privacy.release import BudgetExceeded, Ledger, release
    from stylestream.schemas.events import StyleVectorUpdated
    from stylestream.streams.topics import STYLE_VECTORS

    raw = _latest(bootstrap_servers, STYLE_VECTORS, user_id.encode())
    style = StyleVectorUpdated.model_validate_json(raw) if raw else None
    manifest = _manifest_of(bootstrap_servers, user_id)
    if style is None or style.tombstone or style.version != manifest.version:
        console.print(f"[red]no current style for {user_id}[/]", soft_wrap=True)
        raise typer.Exit(1)
    ledger = Ledger(DataLayout(data_dir).state.root)
    try:
        released = release(style, [p.weight for p in manifest.photos], manifest.embedding_norm, epsilon, budget,
                           ledger)
    except BudgetExceeded as e:
        console.print(f"[red]refused:[/] {e}", soft_wrap=True)
        raise typer.Exit(1) from None
    text = json.dumps(dataclasses.asdict(released), indent=2)
    if output is None:
        print(text)
    else:
        output.write_text(text + "\n")
        console.print(f"wrote {output}: epsilon {epsilon} spent, {released.epsilon_spent_total:.3f} of {budget} "
                      f"in all ({counted(released.releases, 'release')})", soft_wrap=True)


def forget(user_id: User, bootstrap_servers: BootstrapServers,
           wait: Annotated[bool, typer.Option(
               "--wait/--no-wait", help="Wait for ingestion to process it and fetch the receipt.")] = False,
           timeout_s: Annotated[float, typer.Option("--timeout", min=1, metavar="SECONDS")] = 120.0,
           receipt: Annotated[Path | None, typer.Option(
               dir_okay=False, metavar="FILE", help="With --wait: write the signed receipt here.")] = None) -> None:
    """Forget a person: a user_forgotten request on consent-events. Ingestion deletes every record of
    them, once, and publishes a signed erasure receipt under the request's id; serving deletes their
    images and adapters. The request id is random, so the receipt names no one."""
    from stylestream.schemas.events import UserForgotten, to_message
    from stylestream.streams.topics import CONSENT_EVENTS

    clients.require_broker(bootstrap_servers)
    request = UserForgotten(event_id=f"forget-{uuid.uuid4().hex}", user_id=user_id, event_time=datetime.now(UTC))
    clients.send_all(bootstrap_servers, [(CONSENT_EVENTS, *to_message(request))])
    console.print(f"requested: {request.event_id}", soft_wrap=True)
    if not wait:
        console.print(f"ingestion erases the person; then `stylestream receipt get {request.event_id}`",
                      soft_wrap=True)
        return
    deadline = time.monotonic() + timeout_s
    with console.status("waiting for ingestion to erase and sign"):
        while (raw := _receipt_bytes(bootstrap_servers, request.event_id)) is None:
            if time.monotonic() > deadline:
                console.print(f"[red]no receipt after {timeout_s:.0f} s[/]: is ingestion running?", soft_wrap=True)
                raise typer.Exit(1)
            time.sleep(1.0)
    _show_receipt(raw, receipt)


def _receipt_bytes(bootstrap_servers: str, request_id: str) -> bytes | None:
    from stylestream.streams.topics import ERASURE_RECEIPTS

    return _latest(bootstrap_servers, ERASURE_RECEIPTS, request_id.encode())


def _show_receipt(raw: bytes, output: Path | None) -> None:
    from stylestream.schemas.events import ErasureReceipt

    receipt = ErasureReceipt.model_validate_json(raw)
    when = receipt.completed_at.isoformat(timespec="seconds")
    table = Table(title=f"Erased at {when} for {receipt.request_event_id}")
    for column in ("store", "data", "deleted"):
        table.add_column(column)
    for store, kinds in receipt.deleted.items():
        for kind, n in kinds.items():
            table.add_row(store, kind, str(n))
    print_table(console, table)
    for store, what in receipt.pending.items():
        console.print(f"pending ({store}): {what}", soft_wrap=True)
    if output is not None:
        output.write_text(receipt.model_dump_json(indent=2) + "\n")
        console.print(f"wrote the signed receipt to {output}", soft_wrap=True)


@receipt_app.command("get")
def receipt_get(request_id: Annotated[str, typer.Argument(metavar="REQUEST_ID", help="The forget request's id.")],
                bootstrap_servers: BootstrapServers,
                output: Annotated[Path | None, typer.Option("--output", "-o", dir_okay=False, metavar="FILE")]
                = None) -> None:
    """The signed erasure receipt of a forget request (from the erasure-receipts topic)."""
    raw = _receipt_bytes(bootstrap_servers, request_id)
    if raw is None:
        console.print(f"[red]no receipt for {request_id} yet[/] (has ingestion processed it?)", soft_wrap=True)
        raise typer.Exit(1)
    _show_receipt(raw, output)


@receipt_app.command("verify")
def receipt_verify(
    receipt: Annotated[Path, typer.Argument(exists=True, dir_okay=False, metavar="RECEIPT",
                                            help="A receipt file (receipt get -o, forget --receipt).")],
    public_key: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, metavar="PEM",
        help="The service's public key (`stylestream receipt public-key`); default: the one in DATA_DIR.")] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Check an erasure receipt's Ed25519 signature: exit 0 if it is exactly as the service signed it."""
    from pydantic import ValidationError

    from stylestream.keyfiles import public_key_pem
    from stylestream.privacy.erasure import load_public_key, load_signing_key, verify_receipt
    from stylestream.schemas.events import ErasureReceipt

    try:
        parsed = ErasureReceipt.model_validate_json(receipt.read_bytes())
    except ValidationError as e:
        console.print(f"[red]not an erasure receipt:[/] {e.errors()[0]['msg']}", soft_wrap=True)
        raise typer.Exit(1) from None
    if public_key is None:
        pem = public_key_pem(load_signing_key(DataLayout(data_dir).state.root))
    else:
        pem = public_key.read_bytes()
    if verify_receipt(parsed, load_public_key(pem)):
        console.print(f"[green]valid[/]: signed by key {parsed.key_id[:16]}…, erasure of "
                      f"{parsed.request_event_id} completed {parsed.completed_at.isoformat(timespec='seconds')}",
                      soft_wrap=True)
        return
    console.print("[red]INVALID[/]: the receipt was changed after signing, or another key signed it", soft_wrap=True)
    raise typer.Exit(1)


@receipt_app.command("public-key")
def receipt_public_key(data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Print the public key that checks this service's receipts (PEM), to publish to people."""
    from stylestream.keyfiles import public_key_pem
    from stylestream.privacy.erasure import load_signing_key

    print(public_key_pem(load_signing_key(DataLayout(data_dir).state.root)).decode(), end="")


def verify(
    manifest: Annotated[Path, typer.Option(exists=True, dir_okay=False, metavar="FILE",
                                           help="A style manifest (`stylestream style manifest -o`).")],
    photos: Annotated[Path, typer.Option(exists=True, file_okay=False, metavar="DIR",
                                         help="Your own copies of your photos (searched recursively).")],
    photo: Annotated[list[Path] | None, typer.Option(
        exists=True, dir_okay=False, metavar="FILE", help="Also say whether this photo counts (repeatable).")]
    = None,
    data_dir: DataDir = DEFAULT_DATA_DIR, clip_model: ClipModel = TINY_CLIP, clip_pretrained: ClipPretrained = None,
) -> None:
    """Recompute a style version from your own photos, on your own machine, and check it against the
    published vector (within 1e-4); exit 0 only if every listed photo was found and the vector matches."""
    from rich.progress import Progress

    from stylestream.models.clip import clip_spec
    from stylestream.privacy.verify import TOLERANCE, CannotVerify, files_by_sha256, photos_in_set
    from stylestream.privacy.verify import verify as check
    from stylestream.schemas.events import StyleManifest

    parsed = StyleManifest.model_validate_json(manifest.read_bytes())
    try:
        with console.status(f"hashing the files under {photos}"):
            files = files_by_sha256(photos)
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("decode and embed", total=len(parsed.photos))
            result = check(parsed, files, clip_spec(DataLayout(data_dir).models, clip_model, clip_pretrained),
                           on_photo=lambda: bar.advance(task))
    except CannotVerify as e:
        console.print(f"[red]cannot verify here:[/] {e}", soft_wrap=True)
        raise typer.Exit(1) from None
    console.print(f"style code {parsed.style_code}: "
                  + ("[green]matches its basis and photos" if result.code_matches else "[red]does NOT match"),
                  soft_wrap=True)
    console.print(f"{result.found} of {counted(len(parsed.photos), 'listed photo')} found among your files")
    for photo_id in result.missing:
        console.print(f"  missing: {photo_id}", soft_wrap=True)
    for photo_id, why in result.unreadable.items():
        console.print(f"  unreadable: {photo_id}: {why}", soft_wrap=True)
    if result.embedding_diff is not None:
        console.print(f"recomputed vector: largest difference {result.embedding_diff:.2e} (embedding), "
                      f"{result.features_diff:.2e} (features); tolerance {TOLERANCE:.0e}")
    console.print("[green]the published vector is the one these photos give[/]" if result.vector_matches
                  else "[red]the published vector could not be reproduced from these files[/]")
    for path, photo_id in photos_in_set(parsed, photo or []).items():
        console.print(f"{path}: " + (f"counts, as {photo_id}" if photo_id else "does not count in this version"),
                      soft_wrap=True)
    if not (result.code_matches and result.vector_matches):
        raise typer.Exit(1)


def audit(
    user: Annotated[list[str] | None, typer.Option(
        metavar="USER_ID", help="Look for this person: their id and their history pseudonym (repeatable).")] = None,
    string: Annotated[list[str] | None, typer.Option(
        metavar="TEXT", help="Look for this exact text, e.g. a planted secret (repeatable).")] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    images: Annotated[Path | None, typer.Option(
        file_okay=False, metavar="DIR", help="The generated images' folder (default: DATA_DIR/images).")] = None,
    bootstrap_servers: Annotated[str | None, typer.Option(
        "--bootstrap-servers", "-b", envvar="STYLESTREAM_BOOTSTRAP_SERVERS", metavar="HOST:PORT",
        help="Also search every topic on this broker (the input topics' findings are listed as the photo "
             "service's).")] = None,
    also: Annotated[list[Path] | None, typer.Option(
        exists=True, metavar="PATH", help="Also search this file or folder, e.g. logs (repeatable).")] = None,
    fmt: OutputFormat = Format.table,
) -> None:
    """Search every store the project writes for a person or given text, and for image bytes where no
    image may be. Exit 0 when nothing is found but what the broker removes by itself in a stated time
    or what lies on the photo service's input topics (both listed, with why), 1 otherwise. Run it
    with ingestion stopped: it reads the state database."""
    from stylestream.cli.drift import emit
    from stylestream.privacy.audit import audit as search
    from stylestream.privacy.audit import needles_for

    layout = DataLayout(data_dir)
    needles = needles_for(user or [], string or [], layout.state)
    if bootstrap_servers:
        clients.require_broker(bootstrap_servers)
    with console.status("searching"):
        findings = search(layout.state, images or layout.images, needles, bootstrap_servers, also or [], user or [],
                          layout.api)
    violations = [f for f in findings if f.violation]
    rows = [{"store": f.store, "where": f.where, "found": f.what, "pending": f.pending or ""} for f in findings]
    if fmt is not Format.table or rows:
        emit(rows, fmt, "Audit findings", {"store": "store", "where": "where", "found": "found", "pending": "pending"})
    if fmt is Format.table:
        looked = f"{counted(len(needles), 'string')} and image bytes"
        console.print(f"[green]nothing found[/] ({looked})" if not findings else
                      f"{counted(len(violations), 'finding')}, {len(findings) - len(violations)} pending ({looked})")
    if violations:
        raise typer.Exit(1)


