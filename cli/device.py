"""`stylestream device sync`: analyse a library on this machine and send only what a style needs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stylestream.cli.options import DEFAULT_DATA_DIR, DataDir, Verbose
from stylestream.cli.output import make_console
from stylestream.cli.privacy import ClipModel, ClipPretrained
from stylestream.cli.words import counted
from stylestream.defaults import TINY_CLIP
from stylestream.pipelines.layout import DataLayout

console = make_console()
device_app = typer.Typer(help="Styles from photos that never leave your device.", no_args_is_help=True)


@device_app.command()
def sync(
    photos: Annotated[Path, typer.Argument(
        exists=True, metavar="PHOTOS",
        help="Your library: a folder (its first-level folders are albums) or a JSON-lines manifest.")],
    api: Annotated[str, typer.Option(envvar="STYLESTREAM_API", metavar="URL",
                                     help="The stylestream API, e.g. https://photos.example/ (its /v1/...).")],
    token: Annotated[str, typer.Option(
        envvar="STYLESTREAM_TOKEN", metavar="TOKEN", show_envvar=True,
        help="Your sign-in token, or a grant with photos:contribute (the variable keeps it out of the "
             "process list).")],
    data_dir: DataDir = DEFAULT_DATA_DIR, clip_model: ClipModel = TINY_CLIP, clip_pretrained: ClipPretrained = None,
    mask_faces: Annotated[bool, typer.Option(
        "--mask-faces", help="Fill faces before measuring, as the service's ingestion does when it masks them "
                             "(the basis must match, or the service refuses the contributions).")] = False,
    verbose: Verbose = False,
) -> None:
    """Decode, measure and embed your photos here, with the service's own code, and send only each
    photo's sha256, size, day taken, embedding and named features: never a pixel or any other metadata.
    Resumable: the photos the service already holds from your device are skipped."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from stylestream.cli.main import _quiet
    from stylestream.models.clip import clip_spec
    from stylestream.privacy.device_sync import Api, SyncError
    from stylestream.privacy.device_sync import sync as run_sync
    from stylestream.transforms.pixels import DecodeLimits

    _quiet(verbose)
    try:
        clip = clip_spec(DataLayout(data_dir).models, clip_model, clip_pretrained)
        columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("analysing", total=None)
            report = run_sync(photos, Api(api, token), clip, DecodeLimits(mask_faces=mask_faces),
                              on_total=lambda n: bar.update(task, total=n), on_photos=lambda n: bar.advance(task, n))
    except (SyncError, ValueError) as e:
        console.print(f"[red]cannot sync:[/] {e}", soft_wrap=True)
        raise typer.Exit(1) from None
    console.print(f"{report.total} photos in {photos}: {counted(report.sent, 'contribution')} sent, "
                  f"{report.already} held already")
    for path, why in report.unusable.items():
        console.print(f"  not usable: {path}: {why}", soft_wrap=True)
