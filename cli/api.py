"""`stylestream api` and its helpers: the HTTP front door, sign-in tokens for trying it, its spec."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated

import typer

from stylestream.cli.options import DEFAULT_DATA_DIR, BootstrapServers, DataDir, Verbose
from stylestream.cli.output import make_console

console = make_console()


def _sizes(value: str) -> str:
    """WIDTHxHEIGHT[,...], each side a multiple of 8 from 16 to 2048 (what generation requests take)."""
    for size in value.split(","):
        sides = size.split("x")
        if len(sides) != 2 or not all(s.isdigit() and 16 <= int(s) <= 2048 and int(s) % 8 == 0 for s in sides):
            raise typer.BadParameter(f"{size!r} is not WIDTHxHEIGHT with sides multiples of 8 from 16 to 2048")
    return value


def _rate(value: str) -> str:
    from limits import parse

    try:
        parse(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a rate such as 300/minute") from None
    return value


def _check_rate_limits(uri: str) -> None:
    """The rate limits' storage answers, or a clear exit."""
    from limits.errors import ConfigurationError
    from limits.storage import storage_from_string

    try:
        storage = storage_from_string(uri)
    except ConfigurationError as e:
        raise typer.BadParameter(f"{uri}: {e}", param_hint="--rate-limits") from None
    if not storage.check():
        console.print(f"[red]the rate limits' storage at {uri} does not answer[/]", soft_wrap=True)
        raise typer.Exit(1)


def api(
    bootstrap_servers: BootstrapServers,
    jwt_public_key: Annotated[Path, typer.Option(
        exists=True, dir_okay=False, envvar="STYLESTREAM_JWT_PUBLIC_KEY", metavar="FILE",
        help="The photo service's token-signing public key: a PEM file, or a JWKS file (keys chosen by kid). "
             "People sign in with JWTs it signed (sub = user id).")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    jwt_issuer: Annotated[str | None, typer.Option(metavar="ISS", help="Require this `iss` claim.")] = None,
    jwt_audience: Annotated[str | None, typer.Option(metavar="AUD", help="Require this `aud` claim.")] = None,
    generation_timeout: Annotated[float, typer.Option(
        min=0, metavar="SECONDS", help="How long a generation request waits before answering 504 with an id "
                                       "to fetch the images later.")] = 60.0,
    sizes: Annotated[str, typer.Option(
        metavar="WxH,...", callback=_sizes, help="The sizes the served model draws; the first is the default.")]
    = "64x64,128x128,256x256,512x512",
    steps: Annotated[int, typer.Option(min=1, max=200, help="Diffusion steps per image.")] = 4,
    images: Annotated[str | None, typer.Option(
        metavar="DIR|URL", help="Where the serving workers write images and clips (their --output; default: "
                                "DATA_DIR/images). Read from there only; clips' starting images are written "
                                "there, and deleted clips deleted.")] = None,
    max_video_seconds: Annotated[float, typer.Option(min=0.1, help="The longest clip POST /v1/videos makes.")] = 6.0,
    max_video_fps: Annotated[int, typer.Option(min=1, max=30, help="Its highest frame rate.")] = 24,
    person_rate: Annotated[str, typer.Option(
        metavar="RATE", callback=_rate, help="Requests a person may make (all their grants together), in `limits` "
                                             "notation: N/second|minute|hour|day.")] = "300/minute",
    grant_rate: Annotated[str, typer.Option(
        metavar="RATE", callback=_rate, help="Requests one grant may make.")] = "120/minute",
    rate_limits: Annotated[str, typer.Option(
        metavar="URI", help="Where the rate limits count: memory:// (this process), or redis://HOST:PORT, which "
                            "replicas of the API share so that a person's limit is one limit across them.")]
    = "memory://",
    reuse_port: Annotated[bool, typer.Option(
        help="Share --port with other `stylestream api` processes (SO_REUSEPORT: the kernel spreads connections "
             "across them): replicas behind one address. Give them one --data-dir and one --rate-limits Redis.")]
    = False,
    verbose: Verbose = False,
) -> None:
    """Serve the HTTP API and the person's page: OpenAI-compatible POST /v1/images/generations and
    /v1/videos, each person's style, switches, data and grants under /v1/me, the page at /, the spec
    at /openapi.json. Ingestion and serving run as their own commands (`ingest --follow`, `serve`)."""
    from stylestream.api.app import create_app
    from stylestream.api.auth import TokenVerifier
    from stylestream.api.config import ApiConfig
    from stylestream.api.system import ApiServer
    from stylestream.cli.main import _quiet, _reach_broker, _stop_on_signals

    _quiet(verbose)
    try:
        verifier = TokenVerifier.from_file(jwt_public_key, jwt_issuer, jwt_audience)
    except ValueError as e:
        raise typer.BadParameter(f"{jwt_public_key}: {e}", param_hint="--jwt-public-key") from None
    if reuse_port and not port:
        raise typer.BadParameter("replicas share a port they name: give --port too", param_hint="--reuse-port")
    _reach_broker(bootstrap_servers, None)
    _check_rate_limits(rate_limits)
    cfg = ApiConfig(bootstrap_servers, data_dir, verifier, generation_timeout, tuple(sizes.split(",")), steps=steps,
                    images=images, max_video_seconds=max_video_seconds, max_video_fps=max_video_fps,
                    person_rate=person_rate, grant_rate=grant_rate, rate_limits=rate_limits)
    stop = _stop_on_signals("answering the requests in progress, then stopping")
    with ApiServer(create_app(cfg), host, port, log_level="info" if verbose else "warning",
                   reuse_port=reuse_port) as server:
        console.print(f"the page: {server.url}/   the spec: {server.url}/docs", soft_wrap=True)
        stop.wait()
    console.print("stopped")


def api_token(
    user_id: Annotated[str, typer.Argument(metavar="USER_ID", help="Whose sign-in token (its `sub`).")],
    issuer_key: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, metavar="FILE",
        help="The private key to sign with (PEM; default: the demo issuer's key under DATA_DIR/api).")] = None,
    hours: Annotated[float, typer.Option(min=0.01, help="How long the token is valid.")] = 12.0,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """A sign-in token for trying the API, signed as a photo service signs them. In production the
    photo service issues these; `stylestream api` only verifies them."""
    from stylestream.api.auth import issue_person_token
    from stylestream.api.system import DemoIssuer

    if issuer_key is None:
        issuer = DemoIssuer(data_dir / "api")
        console.print(f"# verify with --jwt-public-key {_write_public(issuer, data_dir)}", soft_wrap=True)
        print(issuer.token(user_id, timedelta(hours=hours)))
        return
    print(issue_person_token(issuer_key.read_bytes(), user_id, timedelta(hours=hours)))


def _write_public(issuer, data_dir: Path) -> Path:
    path = data_dir / "api" / "demo-issuer.pub.pem"
    path.write_bytes(issuer.public_key_pem())
    return path


def api_spec(check: Annotated[bool, typer.Option(help="Only check the published spec matches the code.")] = False
             ) -> None:
    """Write the OpenAPI spec to api/openapi.json (also served at /openapi.json)."""
    from stylestream.api.openapi import SPEC_PATH, spec_text

    text = spec_text()
    if check:
        if not SPEC_PATH.exists() or SPEC_PATH.read_text() != text:
            console.print(f"[red]{SPEC_PATH} is out of date[/] (run `stylestream api-spec`)", soft_wrap=True)
            raise typer.Exit(1)
        console.print("the published spec matches the code")
        return
    SPEC_PATH.write_text(text)
    console.print(f"wrote {SPEC_PATH}", soft_wrap=True)
