"""`stylestream demo`: the whole system on one machine, with nothing to configure.

Starts a local broker (Apache Kafka where Java is present, else Tansu), writes a synthetic photo
library for three users with clearly different looks, publishes each person's first album (plus one
malformed event) and ingests, then their later albums and ingests again, withdraws one album and
ingests once more, then asks the serving worker for a personalized image per user for each of three
prompts and reports what happened. `DATA_DIR/state` then points at this run's state, so
`stylestream drift ...` reads its history.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import fsspec
import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from stylestream.cli.output import print_table
from stylestream.cli.words import counted, cycle_line
from stylestream.demo.synthetic import LOOKS, SyntheticPhoto, make_library, toggle_event
from stylestream.models.clip import clip_spec
from stylestream.models.diffusion import diffusion_spec
from stylestream.pipelines.ingest import IngestConfig, Ingestor
from stylestream.pipelines.layout import DataLayout
from stylestream.pipelines.store import CycleResult, LatestVersion, Store
from stylestream.schemas.events import ClipRequest, GenerationRequested, encode_event
from stylestream.schemas.tables import FEATURE_NAMES
from stylestream.serving.generator import StyleGenerator
from stylestream.serving.worker import ServeConfig, Worker
from stylestream.streams import clients
from stylestream.streams.broker import Engine, choose_engine, start_local_broker
from stylestream.streams.topics import CONSENT_EVENTS, GENERATION_REQUESTS, PHOTO_EVENTS, ensure_topics
from stylestream.transforms.embed import OpenClipImageHandler, image_styles
from stylestream.transforms.facets import facets_of
from stylestream.transforms.features import describe
from stylestream.transforms.style import style_of

# user -> albums of (album id, look, photo count). Each person's first album is uploaded first, the
# others later, so every style has versions that drift. Ana's "office" album is the one she withdraws.
LIBRARY = {
    "ana": [("beach", "warm", 6), ("office", "cool", 4), ("garden", "green", 4)],
    "ben": [("walks", "cool", 6), ("nights", "moody", 4)],
    "cleo": [("street", "mono", 6), ("studio", "pastel", 4)],
}
WITHDRAWN = ("ana", "office")
DRIFT_EXAMPLE = "ben"
# The tiny model draws crisp black and white (Cleo's look) only with more than serving's default 4 steps.
STEPS = 20
GUIDANCE = 4.0  # the prompt's classifier-free guidance (the style keeps its own strength), as the benchmark's
# The tiny models know subjects, counts and places (demo/synthetic.py). Everyone gets every prompt with
# the same seed; the tables show the first.
DEMO_PROMPTS = ("one house in the centre", "two stars on the left", "three circles on the right")
DEMO_CLIP = ClipRequest(frames=8, fps=8, motion="pan_right")


def clip_id(user: str) -> str:
    """The demo's clip request for `user`."""
    return f"demo-{user}-clip"


def request_id(user: str, prompt: int) -> str:
    """The demo's request for `user` and DEMO_PROMPTS[prompt]."""
    return f"demo-{user}" if prompt == 0 else f"demo-{user}-{prompt}"


def run_demo(data_dir: Path, console: Console, broker_engine: Engine | str = Engine.auto,
             serve_until: Callable[[], threading.Event] | None = None, port: int = 8000) -> dict:
    """The demo; with `serve_until`, its broker, ingestion, serving and the API then keep running
    (the page's address and a sign-in token printed) until the event it returns, asked for only
    then (so Ctrl-C stops the demo itself as usual), is set."""
    run = DataLayout(data_dir / "runs" / datetime.now(UTC).strftime("%Y%m%dT%H%M%S"))  # each run its own
    t0 = time.perf_counter()
    say = console.print
    # 1. Models: the tiny trained ones the package ships, loaded like pretrained weights
    with console.status("loading the models"):
        clip = clip_spec(DataLayout(data_dir).models)
        diffusion = diffusion_spec(clip.pretrained)
    # 2. A local broker, the topics, and the synthetic library
    engine, why = choose_engine(broker_engine)
    with console.status(f"starting the {engine} broker"):
        broker = start_local_broker(engine, run.kafka)
    with broker:
        bs = broker.bootstrap_servers
        ensure_topics(bs)
        say(f"[bold]broker[/] {broker.description} on {bs} ({why})", soft_wrap=True, highlight=False)
        with console.status("writing a synthetic photo library"):
            photos = make_library(run.root / "library", LIBRARY)
        say(f"[bold]library[/] {len(photos)} JPEGs in {run.root / 'library'}: " + ", ".join(
            f"{u} ({', '.join(f'{a}: {LOOKS[look].description}' for a, look, _ in albums)})"
            for u, albums in LIBRARY.items()))
        producer = clients.producer(bs)
        cfg = IngestConfig(bs, run.state.root, clip)
        with Ingestor(cfg) as ingestor:
            # 3. Each person's first album (and a malformed event), then their later albums
            first_albums = {(u, albums[0][0]) for u, albums in LIBRARY.items()}
            first = [p for p in photos if (p.user_id, p.album_id) in first_albums]
            later = [p for p in photos if (p.user_id, p.album_id) not in first_albums]
            malformed = [(b"ben", b'{"type": "photo_uploaded", "user_id": "ben"}')]
            for what, wave, bad in (("first albums", first, malformed), ("later albums", later, [])):
                publish_uploads(producer, wave, bad, what, console)
                ingest(ingestor, console, f"ingesting the {what}")
            before = latest(cfg)
            print_table(console, style_table(before, "style vectors after the uploads"))
            # 4. The opt-out: one album withdrawn
            user, album = WITHDRAWN
            producer.send(CONSENT_EVENTS, key=user.encode(), value=encode_event(
                toggle_event(user, "album", album, False, datetime.now(UTC))))
            producer.flush()
            say(f"[bold]opt-out[/] {user} switched style learning off for album '{album}'")
            ingest(ingestor, console, "ingesting the opt-out")
        after = latest(cfg)
        say(opt_out_report(before, after, cfg, user))
        # 5. One image per person and prompt, same seed, through the serving worker
        results = generate_images(producer, bs, run, diffusion, clip, console)
        # 6. What the images show, against the style each was conditioned on
        print_table(console, results_table(results))
        used = styles_used(results, cfg)
        first = [r for r in results if r.request_id == request_id(r.user_id, 0)]
        print_table(console, personalization_table(first, used, clip))
        picture = people_by_prompts(results, used, run.root / "personalization.png")
        if serve_until is not None:
            keep_serving(cfg, run, diffusion, clip, console, serve_until(), port)
    elapsed = time.perf_counter() - t0
    say(f"[bold green]done[/] in {elapsed:.0f} s. State: {cfg.db_path}  History: {cfg.history_dir}")
    say(f"personalization, people x prompts: {picture}", soft_wrap=True, highlight=False)
    clips = {r.user_id: r.image_uri for r in results if r.type == "generation_completed" and r.frames}
    for user, uri in sorted(clips.items()):
        say(f"a short clip in {user}'s style: {uri}", soft_wrap=True, highlight=False)
    history = "" if point_state_at(data_dir, run.state.root) else f" --history {cfg.history_dir}"
    # one line, to copy; the analytics key beside the history maps the user id to its pseudonym
    say(f"drift: stylestream drift user {DRIFT_EXAMPLE}{history} --plot {DRIFT_EXAMPLE}.png", soft_wrap=True,
        highlight=False)
    return {"run_dir": run.root, "before": before, "after": after, "results": results, "seconds": elapsed,
            "picture": picture, "clips": clips}


def keep_serving(cfg: IngestConfig, run: DataLayout, diffusion, clip, console: Console, stop: threading.Event,
                 port: int) -> None:
    """Ingestion following, a serving worker and the API on this run's broker and data, until `stop`."""
    from stylestream.api.config import ApiConfig
    from stylestream.api.system import DemoIssuer, running_services

    issuer = DemoIssuer(run.root / "api")
    api = ApiConfig(cfg.bootstrap_servers, run.root, issuer.verifier(), steps=STEPS)  # as the demo's own images
    with console.status("starting ingestion (following), serving and the API"):
        services = running_services(api, cfg, ServeConfig(cfg.bootstrap_servers, str(run.images)),
                                    StyleGenerator(diffusion, clip), port=port)
        server = services.__enter__()
    try:
        user = WITHDRAWN[0]
        token = issuer.token(user)
        say = console.print
        say(f"[bold]serving[/] the page for {user}: {server.url}/#token={token}", soft_wrap=True, highlight=False)
        say(f"sign-in token for {user} (paste it on the page, or use it as the OpenAI client's api_key with "
            f"base_url {server.url}/v1):\n{token}", soft_wrap=True, highlight=False)
        say(f"other people's tokens: stylestream api-token ben --data-dir {run.root}; the API's spec: "
            f"{server.url}/docs. Ctrl-C stops everything.", soft_wrap=True, highlight=False)
        stop.wait()
    finally:
        with console.status("stopping the services"):
            services.__exit__(None, None, None)


def publish_uploads(producer, photos: list[SyntheticPhoto], bad: list[tuple[bytes, bytes]], what: str,
                    console: Console) -> None:
    """The photos' upload events and any malformed (key, value) messages, as a photo service sends them."""
    for p in photos:
        producer.send(PHOTO_EVENTS, key=p.user_id.encode(), value=encode_event(p.upload_event()))
    for key, value in bad:
        producer.send(PHOTO_EVENTS, key=key, value=value)
    producer.flush()
    also = f" and {counted(len(bad), 'malformed event')}" if bad else ""
    console.print(f"[bold]published[/] {counted(len(photos), 'upload')} of the {what}{also} to {PHOTO_EVENTS}")


def generate_images(producer, bootstrap_servers: str, run: DataLayout, diffusion, clip, console: Console) -> list:
    """One request per person and prompt (and one for a user with no photos), answered by the serving
    worker."""
    requests = [GenerationRequested(
        event_id=f"req-{request_id(u, k)}", user_id=u, event_time=datetime.now(UTC), request_id=request_id(u, k),
        prompt=prompt, seed=7, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
        for k, prompt in enumerate(DEMO_PROMPTS) for u in LIBRARY]
    requests += [GenerationRequested(  # and a short clip each, panning across the first prompt's picture
        event_id=f"req-{clip_id(u)}", user_id=u, event_time=datetime.now(UTC), request_id=clip_id(u),
        prompt=DEMO_PROMPTS[0], seed=7, num_inference_steps=STEPS, guidance_scale=GUIDANCE, clip=DEMO_CLIP)
        for u in LIBRARY]
    requests.append(GenerationRequested(
        event_id="req-nobody", user_id="nobody", event_time=datetime.now(UTC) + timedelta(seconds=1),
        request_id=request_id("nobody", 0), prompt=DEMO_PROMPTS[0], seed=7, num_inference_steps=STEPS,
        guidance_scale=GUIDANCE))
    for r in requests:
        producer.send(GENERATION_REQUESTS, key=r.user_id.encode(), value=encode_event(r))
    producer.flush()
    producer.close()
    console.print(f"[bold]requests[/] {len(requests)} generation requests ({len(DEMO_PROMPTS)} prompts and a "
                  f"{DEMO_CLIP.frames}-frame clip per person, one for a user with no photos)")
    results = []
    with console.status("serving: loading the diffusion pipeline and generating"):
        generator = StyleGenerator(diffusion, clip)
        with Worker(ServeConfig(bootstrap_servers, str(run.images)), generator) as worker:
            worker.run(max_requests=len(requests), idle_exit_s=30, on_result=results.append)
    return results


def point_state_at(data_dir: Path, state: Path) -> bool:
    """Make DATA_DIR/state a link to this run's state, so every command's default finds it; never
    replaces a real state folder (only a previous demo's link). Returns whether the link is in place."""
    link = DataLayout(data_dir).state.root
    if link.exists() and not link.is_symlink():
        return False
    if link.is_symlink():
        link.unlink()
    link.symlink_to(state.relative_to(data_dir), target_is_directory=True)
    return True


def ingest(ingestor: Ingestor, console: Console, what: str) -> list[CycleResult]:
    with console.status(what):
        done = ingestor.run_until_caught_up(on_cycle=lambda r: console.print(f"  {cycle_line(r)}"))
    return done


def latest(cfg: IngestConfig) -> dict[str, LatestVersion]:
    with Store(cfg.db_path) as store:
        return store.latest_vectors()


def style_table(vectors: dict[str, LatestVersion], title: str) -> Table:
    shown = ("warmth", "saturation", "contrast", "brightness")
    t = Table(title=title)
    for col in ("user", "version", "photos", *shown):
        t.add_column(col, justify="right" if col != "user" else "left")
    for user, latest_version in sorted(vectors.items()):
        named = dict(zip(FEATURE_NAMES, latest_version.features, strict=True))
        t.add_row(user, str(latest_version.version), str(latest_version.photo_count),
                  *(f"{named[n]:+.3f}" for n in shown))
    return t


def opt_out_report(before: dict[str, LatestVersion], after: dict[str, LatestVersion], cfg: IngestConfig,
                   user: str) -> str:
    was, now = before[user], after[user]
    deltas = dict(zip(FEATURE_NAMES, now.features - was.features, strict=True))
    moved = ", ".join(f"{n} {d:+.3f}" for n, d in sorted(deltas.items(), key=lambda kv: -abs(kv[1]))[:3])
    with Store(cfg.db_path) as store:
        remaining = list(store.stored_contributions([user])[user].values())
    scratch, _ = style_of(np.stack([c.embedding for c in remaining]), np.stack([c.features for c in remaining]),
                          np.array([c.weight for c in remaining]))
    return (f"[bold]opt-out effect[/] {user}: version {was.version} -> {now.version}, photos {was.photo_count} -> "
            f"{now.photo_count}; largest feature moves: {moved}; cosine distance to before "
            f"{1 - float(was.embedding @ now.embedding):.4f}; max |difference| to a from-scratch vector without "
            f"the album {np.abs(scratch - now.embedding).max():.1e}")


def results_table(results: list) -> Table:
    t = Table(title="generation results")
    for col in ("request", "outcome", "style version", "facet"):
        t.add_column(col)
    t.add_column("image / reason", overflow="fold")
    for r in results:
        if r.type == "generation_completed":
            t.add_row(r.request_id, "completed", str(r.style_version),
                      "overall" if r.facet is None else str(r.facet), r.image_uri)
        else:
            t.add_row(r.request_id, "[red]failed[/]", "-", "-", r.reason)
    return t


def styles_used(results: list, cfg: IngestConfig) -> dict[str, np.ndarray]:
    """request id -> the features of the style its image was conditioned on: the facet the worker chose
    for the prompt, or the overall style."""
    completed = [r for r in results if r.type == "generation_completed"]
    with Store(cfg.db_path) as store:
        overall = store.latest_vectors()
        stored = store.stored_contributions([r.user_id for r in completed])
    return {r.request_id: overall[r.user_id].features if r.facet is None
            else facets_of(stored[r.user_id])[r.facet].stats.vector()[1] for r in completed}


def completed_images(results: list) -> dict[str, Image.Image]:
    """request id -> its generated image, for the completed requests."""
    out = {}
    for r in results:
        if r.type == "generation_completed" and r.frames is None:
            with fsspec.open(r.image_uri, "rb") as f:
                out[r.request_id] = Image.open(f).convert("RGB")
    return out


def personalization_table(results: list, styles: dict[str, np.ndarray], clip) -> Table:
    """Per person: the style their image was conditioned on, in words, next to what the generated
    image shows, measured by the same embedding and feature code as their photos."""
    user_of = {r.request_id: r.user_id for r in results}
    found = completed_images(results)
    measured = dict(zip(found, image_styles(*_clip_handler(clip), list(found.values()))[1], strict=True))
    t = Table(title="does each image follow its person's style? (same prompt and seed for everyone)")
    for col in ("user", "their style (the facet used)", "their generated image"):
        t.add_column(col)
    for rid in sorted(found):
        t.add_row(user_of[rid], describe(styles[rid]), describe(measured[rid]))
    return t


def _clip_handler(clip):
    handler = OpenClipImageHandler(clip, device="cpu")
    return handler, handler.load_model()


def people_by_prompts(results: list, styles: dict[str, np.ndarray], path: Path) -> Path:
    """A grid of the images, one row per person and one column per prompt (same seed for everyone):
    down a column the person changes, along a row the prompt. Under each image, the three colours of
    the style it was conditioned on (the facet the prompt picked, named in its title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stylestream.analytics.plot import palette_rgb

    images = completed_images(results)
    facet_of = {r.request_id: r.facet for r in results if r.request_id in images}
    users = sorted({r.user_id for r in results if r.request_id in images})
    fig, axes = plt.subplots(len(users), len(DEMO_PROMPTS), figsize=(2.6 * len(DEMO_PROMPTS), 3.0 * len(users)),
                             squeeze=False)
    for row, user in enumerate(users):
        for col, prompt in enumerate(DEMO_PROMPTS):
            ax, rid = axes[row][col], request_id(user, col)
            ax.axis("off")
            if rid not in images:
                continue
            picture = np.asarray(images[rid].resize((96, 96), Image.Resampling.NEAREST), float) / 255
            colours = palette_rgb(np.asarray([styles[rid]]))[:, 0]  # (3 colours, 3)
            strip = np.repeat(colours[None], 12, 0).repeat(32, 1)  # (12, 96, 3)
            ax.imshow(np.vstack([picture, strip]), interpolation="nearest")
            facet = "overall style" if facet_of[rid] is None else f"facet {facet_of[rid]}"
            ax.set_title(f"{user}: {prompt}\n({facet})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
