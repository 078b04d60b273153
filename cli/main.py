"""The `stylestream` command."""

from __future__ import annotations

import itertools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import click
import typer

from stylestream.cli.api import api, api_spec, api_token
from stylestream.cli.device import device_app
from stylestream.cli.drift import drift_app, emit, history_app
from stylestream.cli.options import DEFAULT_DATA_DIR, BootstrapServers, DataDir, Format, OutputFormat, Verbose
from stylestream.cli.output import make_console
from stylestream.cli.privacy import audit, forget, receipt_app, style_app, verify
from stylestream.cli.train import train_adapter
from stylestream.cli.words import counted, cycle_line
from stylestream.defaults import HALF_LIFE_DAYS, MAX_EVENTS_PER_PARTITION, MIN_HALF_LIFE_DAYS, TINY_CLIP
from stylestream.pipelines.layout import DataLayout
from stylestream.streams import clients
from stylestream.streams.broker import BrokerError, Engine, choose_engine, start_local_broker
from stylestream.streams.topics import DLQ_SOURCES

app = typer.Typer(
    help="Learn each person's visual style from their photo stream and personalize image generation with it.",
    no_args_is_help=True, pretty_exceptions_show_locals=False, rich_markup_mode=None,
    context_settings={"max_content_width": 120})  # plain help: reads the same piped or in a terminal
schemas_app = typer.Typer(help="Event contracts as JSON Schema files.", no_args_is_help=True)
app.add_typer(schemas_app, name="schemas")
app.add_typer(drift_app, name="drift")
app.add_typer(history_app, name="history")
app.add_typer(style_app, name="style")
app.add_typer(receipt_app, name="receipt")
app.add_typer(device_app, name="device")
console = make_console()


def _quiet(verbose: bool) -> None:
    # Beam and kafka-python log routine warnings (optional cloud clients, reconnects) at WARNING/ERROR.
    logging.basicConfig(level=logging.INFO if verbose else logging.CRITICAL,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub at run time
    if not verbose:
        for var in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
            os.environ.setdefault(var, "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for noisy in ("apache_beam", "kafka", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.CRITICAL)


def _headline(e: Exception) -> str:
    """An error's first line: what went wrong (logs and output that follow are for --verbose/debug)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


_RETRIES = itertools.count(1)  # what a long-running command meets is never retried silently


def _say_retry(e: Exception, delay: float) -> None:
    console.print(f"[yellow]{clients.describe(e)}; retrying in {delay:.1f} s (retry {next(_RETRIES)})", soft_wrap=True)


def _stop_on_signals(what: str) -> threading.Event:
    """An event set by Ctrl-C or SIGTERM, for commands that finish the step in progress first."""
    stop = threading.Event()

    def on_signal(signum, _frame):
        console.print(f"{signal.Signals(signum).name}: {what}")
        stop.set()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    return stop


def _reach_broker(bootstrap_servers: str, stop, on_retry=None) -> bool:
    """Whether a broker answers. With `on_retry` (commands meant to run long) it is retried with
    backoff until it answers or `stop` is set; without, an unreachable broker ends the command."""
    if on_retry is None:
        try:
            clients.require_broker(bootstrap_servers)
        except clients.BrokerUnreachable as e:
            console.print(f"[red]error:[/] {e}", soft_wrap=True)
            raise typer.Exit(1) from None
        return True
    clients.with_backoff(lambda: clients.require_broker(bootstrap_servers), stop, on_retry)
    if stop.is_set():
        console.print("stopped before the broker answered")
    return not stop.is_set()


@app.command()
def broker(port: Annotated[int, typer.Option(
    min=0, max=65535, metavar="PORT", help="Port on 127.0.0.1 (default: a free one).")] = 0,
           partitions: Annotated[int, typer.Option(min=1, max=1000, metavar="N", help="Partitions per topic.")] = 4,
           engine: Annotated[Engine, typer.Option(
               help="kafka: Apache Kafka (KRaft, data kept under DATA_DIR/kafka, needs Java); tansu: a "
                    "memory-only Kafka-protocol broker; auto: kafka where Java is present.")] = Engine.auto,
           nodes: Annotated[int, typer.Option(
               min=1, max=9, metavar="N", help="Kafka only: a cluster of N nodes on 127.0.0.1, each a broker and a "
                                               "controller (3: replication 3, writes need 2 of them).")] = 1,
           data_dir: DataDir = DEFAULT_DATA_DIR, verbose: Verbose = False) -> None:
    """Run a local broker (or a Kafka cluster) with the stylestream topics until Ctrl-C."""
    from stylestream.streams.broker_process import port_open
    from stylestream.streams.kafka_broker import start_kafka_cluster
    from stylestream.streams.topics import ensure_topics

    if port and port_open(port):
        raise typer.BadParameter(f"port {port} on 127.0.0.1 is already in use", param_hint="--port")
    engine, why = choose_engine(engine)
    if nodes > 1 and engine != Engine.kafka:
        raise typer.BadParameter(f"a cluster is Apache Kafka's, and Kafka cannot run here ({why})",
                                 param_hint="--nodes")
    if nodes > 1 and port:
        raise typer.BadParameter("a cluster's nodes take free ports: drop --port", param_hint="--nodes")
    t0 = time.perf_counter()
    try:
        b = (start_kafka_cluster(DataLayout(data_dir).kafka / f"cluster-{nodes}", nodes) if nodes > 1
             else start_local_broker(engine, DataLayout(data_dir).kafka, port or None))
    except BrokerError as e:  # the first line says what; the broker's log follows for --verbose
        console.print(f"[red]cannot start the {engine.value} broker:[/] {_headline(e)}", soft_wrap=True)
        if verbose:
            console.print(str(e), soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None
    stop = _stop_on_signals("stopping broker")  # from here on a started broker is always stopped
    try:
        created = ensure_topics(b.bootstrap_servers, partitions)
        console.print(f"{b.description} listening on [bold]{b.bootstrap_servers}[/] ({why}; started in "
                      f"{time.perf_counter() - t0:.1f} s)", soft_wrap=True)
        console.print(f"topics created: {', '.join(created)} ({partitions} partitions, keyed by user)" if created
                      else "topics: all there already")
        console.print(f"export STYLESTREAM_BOOTSTRAP_SERVERS={b.bootstrap_servers}")
        # Runs while a majority of nodes lives (a cluster carries on without one; a single broker is one)
        alive = {f"node {n}": node.process for n, node in b.nodes.items()} if nodes > 1 else {"broker": b.process}
        while len(alive) > nodes // 2 and not stop.wait(0.5):
            for name, process in list(alive.items()):
                if process.poll() is not None:
                    console.print(f"[red]{name} exited with status {process.returncode}[/]")
                    del alive[name]
        if not stop.is_set():
            raise typer.Exit(1)
    finally:
        b.stop()


@app.command()
def ingest(
    bootstrap_servers: BootstrapServers,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    clip_model: Annotated[str, typer.Option(
        metavar="NAME", help="open_clip architecture name.")] = TINY_CLIP,
    clip_pretrained: Annotated[str | None, typer.Option(
        metavar="TAG|FILE",
        help="open_clip pretrained tag or checkpoint path (required for any model but the tiny default).")] = None,
    half_life_days: Annotated[float, typer.Option(
        min=MIN_HALF_LIFE_DAYS, metavar="DAYS",
        help="A photo this much newer weighs twice as much.")] = HALF_LIFE_DAYS,
    max_events_per_partition: Annotated[int, typer.Option(
        min=1, metavar="N",
        help="At most this many events of each partition per cycle (bounds a cycle's memory and time).")
    ] = MAX_EVENTS_PER_PARTITION,
    follow: Annotated[bool, typer.Option(
        "--follow/--until-caught-up",
        help="Keep processing new events until Ctrl-C or SIGTERM, or process what is there and exit.")] = False,
    mask_faces: Annotated[bool, typer.Option(
        "--mask-faces/--keep-faces",
        help="Fill faces before the features and the embedding see a photo (OpenCV's bundled face cascade), "
             "so people's faces do not shape styles. Use one setting for the life of a state.")] = False,
    jpeg_device: Annotated[str | None, typer.Option(
        metavar="DEVICE",
        help="Decode JPEGs a batch at a time on this torch device (cuda: nvJPEG; cpu: the same decoder on the "
             "CPU, slower than Pillow's reduced-size decoding), other formats with Pillow. Part of the style's "
             "basis, as --mask-faces is: verifying repeats it.")] = None,
    erasure_batch_s: Annotated[float, typer.Option(
        min=0, metavar="S",
        help="Let erasures wait up to this long to share one rewrite of the state file (which costs in "
             "proportion to everyone's state; see the README's capacity table); their receipts follow it. "
             "0: each forget's rewrite at once. A run that catches up and exits rewrites before it ends; a "
             "stopped --follow leaves the waiting rewrite to the next run.")] = 0.0,
    config: SettingsFile = None,
    verbose: Verbose = False,
) -> None:
    """Process new photo and consent events in cycles; each cycle commits exactly once.

    Stopping (Ctrl-C, SIGTERM) waits for the cycle in progress, which either commits or leaves no
    trace. With --follow a broker that cannot be reached is retried with backoff, and so is (with a
    count) an error that waiting may not fix; without, either ends the command with exit 1 within
    seconds, and so does a stop before it caught up.
    """
    _quiet(verbose)

    from stylestream.pipelines.ingest import IngestConfig, connect

    settings = _settings(config, data_dir=data_dir, clip_model=clip_model, clip_pretrained=clip_pretrained,
                         half_life_days=half_life_days, mask_faces=mask_faces,
                         jpeg_device=jpeg_device)
    stop = _stop_on_signals("finishing the cycle in progress, then stopping")
    if not _reach_broker(bootstrap_servers, stop, _say_retry if follow else None):
        return
    cfg = IngestConfig(bootstrap_servers, settings.state.root, settings.clip, settings.half_life_days,
                       max_events_per_partition, limits=settings.limits, erasure_batch_s=erasure_batch_s)
    try:
        with console.status(f"loading {cfg.clip.describe()}, reading the committed offsets"):
            ingestor = connect(cfg, stop, _say_retry, retry_all=follow)
        if ingestor is None:
            console.print("stopped before the broker answered")
            raise typer.Exit(0 if follow else 1)
        with ingestor:
            cycles = ingestor.run(stop, follow, on_cycle=lambda r: console.print(cycle_line(r)), on_retry=_say_retry)
    except clients.BROKER_ERRORS as e:  # one that waiting cannot fix (`clients.retriable`)
        console.print(f"[red]error:[/] {clients.describe(e)}", soft_wrap=True)
        raise typer.Exit(1) from None
    console.print(f"{'stopped' if stop.is_set() else 'caught up'} after {counted(cycles, 'cycle')}; "
                  f"state in {cfg.db_path}, history in {cfg.history_dir}")
    if stop.is_set() and not follow:  # asked to catch up, and did not
        raise typer.Exit(1)


SettingsFile = Annotated[Path | None, typer.Option(
    "--config", exists=True, dir_okay=False, metavar="FILE",
    help="Ingestion settings as JSON (pipelines/settings.py), as the streaming runners read them; options "
         "given on the command line win.")]


def _settings(config: Path | None, **given):
    """The settings every runner reads (pipelines/settings.py): the file's, under the options given."""
    from stylestream.pipelines.settings import IngestSettings, SettingsError

    ctx = click.get_current_context(silent=True)  # none when another command calls this one's function
    if config is not None and ctx is not None:
        given = {k: v for k, v in given.items() if ctx.get_parameter_source(k) != click.core.ParameterSource.DEFAULT}
    try:
        return IngestSettings.from_file(config, **given) if config else IngestSettings.of(**given)
    except (SettingsError, TypeError) as e:
        console.print(f"[red]{e}[/]", soft_wrap=True)
        raise typer.Exit(2) from None


@app.command("flink-job", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                            "help_option_names": []}, add_help_option=False)
def flink_job(ctx: typer.Context) -> None:
    """Run the Flink job (pipelines/flink_job.py) in the Flink environment, which `make flink` builds
    once (and this builds if missing); every argument goes to it: `stylestream flink-job --help`."""
    from stylestream.pipelines.flink_setup import ensure_flink

    try:
        python = str(ensure_flink())
    except (RuntimeError, subprocess.CalledProcessError) as e:
        console.print(f"[red]cannot build the Flink job's environment: {e}[/]")
        raise typer.Exit(1) from None
    os.execv(python, [python, "-m", "stylestream.pipelines.flink_job", *ctx.args])


@history_app.command("follow")
def history_follow(
    bootstrap_servers: BootstrapServers,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    follow: Annotated[bool, typer.Option(
        "--follow/--until-caught-up", help="Keep writing until Ctrl-C or SIGTERM, or write what is there and exit.")
    ] = True,
    config: SettingsFile = None,
    verbose: Verbose = False,
) -> None:
    """Write the Parquet history of a streaming runner (Prism, the Flink job) from the style vectors it
    publishes, and carry out its erasures beside the state (history, release ledger, backfill), then
    sign and publish their receipts. Run one beside the runner, on the machine that keeps the state."""
    _quiet(verbose)
    from stylestream.pipelines.history_writer import HistoryWriter
    from stylestream.pipelines.settings import SettingsError

    settings = _settings(config, data_dir=data_dir)
    stop = _stop_on_signals("finishing the step in progress, then stopping")
    if not _reach_broker(bootstrap_servers, stop, _say_retry if follow else None):
        return
    try:
        with HistoryWriter(bootstrap_servers, settings) as writer:
            console.print(f"writing the history of {settings.state.root} from {bootstrap_servers}"
                          f"{' until Ctrl-C' if follow else ''}")
            writer.run(stop, follow, on_step=lambda n: console.print(f"{counted(n, 'style-vector message')} "
                                                                    "written to the history"))
    except SettingsError as e:
        console.print(f"[red]{e}[/]", soft_wrap=True)
        raise typer.Exit(1) from None
    console.print(f"{'stopped' if stop.is_set() else 'caught up'}; history in {settings.state.history}")


@app.command()
def backfill(
    source: Annotated[Path, typer.Argument(
        exists=True, metavar="SOURCE",
        help="A library folder (albums are its first-level folders) or a JSON-lines manifest.")],
    user: Annotated[str, typer.Option("--user", "-u", metavar="USER_ID", help="Whose library it is.")],
    bootstrap_servers: BootstrapServers,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    ingest_after: Annotated[bool, typer.Option("--ingest/--publish-only",
                                               help="Run ingestion until caught up after publishing.")] = True,
    verbose: Verbose = False,
) -> None:
    """Bring an existing library in through the live path, exactly once, resumable after interruption."""
    _quiet(verbose)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    _reach_broker(bootstrap_servers, None)

    from stylestream.pipelines import backfill as bf

    items = bf.scan(source)
    state = DataLayout(data_dir).state
    progress_file = bf.Progress(state.root, user, source)
    already = progress_file.published()
    console.print(f"{len(items)} photos in {source}; {already} published by an earlier run")
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("publishing", total=len(items), completed=already)
        bf.publish(bootstrap_servers, items, user, progress_file, state.libraries,
                   on_item=lambda n: bar.update(task, completed=n))
    if ingest_after:
        ingest(bootstrap_servers, data_dir, follow=False, verbose=verbose)


@app.command()
def serve(
    bootstrap_servers: BootstrapServers,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    output: Annotated[str | None, typer.Option(
        metavar="DIR|URL", help="Folder or fsspec URL for images (default: DATA_DIR/images).")]
    = None,
    diffusion_model: Annotated[str | None, typer.Option(
        metavar="DIR",
        help="A local diffusers StableDiffusionPipeline folder (default: the tiny trained style model).")] = None,
    ip_adapter: Annotated[str | None, typer.Option(
        metavar="FILE", help="IP-Adapter-format weight file whose projection takes the style vector.")] = None,
    hyper_lora: Annotated[str | None, typer.Option(
        metavar="FILE",
        help="Hyper-LoRA file trained with that adapter: per-user LoRA made from each style version.")] = None,
    clip_model: Annotated[str, typer.Option(
        metavar="NAME", help="The embedding model ingestion uses (its text tower picks "
                             "facets by prompt).")] = TINY_CLIP,
    clip_pretrained: Annotated[str | None, typer.Option(
        metavar="TAG|FILE", help="Its pretrained tag or checkpoint path.")] = None,
    lora_dir: Annotated[Path | None, typer.Option(
        metavar="DIR",
        help="Folder of per-user LoRA adapters, <user_id>.safetensors (diffusers LoRA format); a user's own "
             "adapter takes the place of the hyper-LoRA's.")] = None,
    max_loras: Annotated[int, typer.Option(
        min=1, metavar="N", help="LoRA adapters kept loaded on the device at once.")] = 8,
    max_batch: Annotated[int, typer.Option(min=1, metavar="N", help="Requests per diffusion call, across users.")] = 8,
    max_wait_ms: Annotated[int, typer.Option(
        min=0, metavar="MS", help="How long a request waits for others to share its call.")] = 50,
    metrics_port: Annotated[int | None, typer.Option(
        min=1, max=65535, metavar="PORT",
        help="Serve Prometheus metrics on 127.0.0.1:PORT/metrics.")] = None,
    max_requests: Annotated[int | None, typer.Option(min=1, metavar="N", help="Exit after this many requests.")] = None,
    idle_exit_s: Annotated[float | None, typer.Option(
        min=0, metavar="SECONDS", help="Exit after this long without requests.")] = None,
    verbose: Verbose = False,
) -> None:
    """Serve generation requests with each user's latest style until stopped."""
    _quiet(verbose)
    from stylestream.models.clip import clip_spec
    from stylestream.models.diffusion import diffusion_spec
    from stylestream.serving.generator import StyleGenerator
    from stylestream.serving.metrics import ServeMetrics
    from stylestream.serving.worker import ServeConfig, Worker

    try:  # model paths checked before the broker is waited for
        clip = clip_spec(DataLayout(data_dir).models, clip_model, clip_pretrained)
        spec = diffusion_spec(clip.pretrained, diffusion_model, ip_adapter, hyper_lora)
    except ValueError as e:
        console.print(f"[red]cannot serve:[/] {e}", soft_wrap=True)
        raise typer.Exit(2) from None
    stop = _stop_on_signals("answering the batch in progress, then stopping")
    if not _reach_broker(bootstrap_servers, stop, _say_retry):
        return
    cfg = ServeConfig(bootstrap_servers, output or str(DataLayout(data_dir).images), max_batch=max_batch,
                      max_wait_ms=max_wait_ms)
    metrics = ServeMetrics()
    if metrics_port:
        metrics.serve_http(metrics_port)
        console.print(f"metrics on http://127.0.0.1:{metrics_port}/metrics")
    with console.status(f"loading {spec.describe()}"):
        generator = StyleGenerator(spec, clip, lora_dir=lora_dir, max_loras=max_loras)
    with console.status("reading every user's latest style vector"):
        worker = Worker(cfg, generator, metrics)
    with worker:
        console.print(f"serving with {spec.describe()}; {counted(len(worker.styles.users()), 'user')} with a style")
        n = worker.run(max_requests, idle_exit_s, stop=stop, on_result=lambda r: console.print(
            f"{r.request_id}: " + (f"{r.image_uri} (style v{r.style_version}, "
                                   f"{'overall style' if r.facet is None else f'facet {r.facet}'})"
                                   if r.type == "generation_completed"
                                   else f"failed: {r.reason}")))
    console.print(f"handled {counted(n, 'request')}")


@app.command()
def demo(data_dir: DataDir = DEFAULT_DATA_DIR, verbose: Verbose = False,
         broker_engine: Annotated[Engine, typer.Option(
             "--broker", help="The local broker to start: kafka (needs Java), tansu, or auto (kafka where "
                              "Java is present).")] = Engine.auto,
         serve: Annotated[bool, typer.Option(
             "--serve", help="Afterwards keep the broker, ingestion, serving and the API running until Ctrl-C, "
                             "and print the page's address with a sign-in token.")] = False,
         port: Annotated[int, typer.Option(min=0, max=65535, help="With --serve: the API's port (0: any free "
                                                                   "one).")] = 8000) -> None:
    """Everything on one machine: broker, synthetic photos, ingestion, an opt-out, personalized images."""
    _quiet(verbose)
    from stylestream.demo.run import run_demo

    run_demo(data_dir, console, broker_engine, port=port,
             serve_until=(lambda: _stop_on_signals("stopping the demo's services")) if serve else None)


DlqSource = StrEnum("DlqSource", {t.replace("-", "_"): t for t in DLQ_SOURCES})


@app.command()
def dlq(
    bootstrap_servers: BootstrapServers,
    topic: Annotated[DlqSource | None, typer.Option(
        metavar="TOPIC", help="Only the bad input of this topic (default: all).")] = None,
    last: Annotated[int, typer.Option(min=1, metavar="N", help="The newest this many.")] = 20,
    fmt: OutputFormat = Format.table,
    verbose: Verbose = False,
) -> None:
    """Dead letters: input that could not be used, why, where it came from, and a preview of it."""
    _quiet(verbose)
    from stylestream.schemas.dead_letters import read_dead_letter
    from stylestream.streams.topics import dlq as dlq_of

    _reach_broker(bootstrap_servers, None)
    rows = [read_dead_letter(m.value) for t in ([topic.value] if topic else DLQ_SOURCES)
            for m in clients.read_all(bootstrap_servers, dlq_of(t))]
    rows = sorted(rows, key=lambda r: r["failed_at"] or "")[-last:]
    if fmt is Format.table and not rows:
        console.print("no dead letters")
        return
    emit(rows, fmt, f"Dead letters (newest {len(rows)})",
         {"failed_at": "failed at", "source": "from", "stage": "stage", "reason": "reason", "preview": "preview"})


app.command()(forget)  # the privacy commands: cli/privacy.py
app.command()(verify)
app.command()(audit)
app.command()(api)  # the HTTP front door: cli/api.py
app.command("api-token")(api_token)
app.command("api-spec")(api_spec)
app.command("train-adapter")(train_adapter)  # listed in --help after the commands that run the system


@schemas_app.command("export")
def schemas_export(check: Annotated[bool, typer.Option(help="Only check the files match the code.")] = False) -> None:
    """Write schemas/json/<topic>.schema.json from the contracts in schemas/events.py."""
    from stylestream.schemas.export import export, stale

    if check:
        if bad := stale():
            console.print(f"[red]out of date: {', '.join(bad)}[/] (run `stylestream schemas export`)")
            raise typer.Exit(1)
        console.print("JSON Schema files match the code")
        return
    for path in export():
        console.print(f"wrote {path}")


_CTRL_C = threading.Event()
_DELIVERED = threading.Event()  # the handler raised the interrupt since it was last sent again
_ENDED = threading.Event()
# A Ctrl-C a library swallowed comes again once the command has run on for CARRYING_ON_S as if nothing
# happened (no exception being handled in its main thread), and in any case after INSIST_S: longer than
# a command takes to wind down on a busy machine (the demo stopping its broker: 13 s seen). So a command
# stops in order in `finally` blocks and `__exit__` (which run while the interrupt unwinds it), or on
# `_stop_on_signals`; not after an `except KeyboardInterrupt` block, where nothing unwinds it any more.
# (C code that takes the interrupt and winds down for over CARRYING_ON_S before raising it, as DuckDB
# interrupting a query could, would be interrupted again.)
CARRYING_ON_S = 1.0
INSIST_S = 30.0
_POLL_S = 0.1


def _on_ctrl_c(signum, frame) -> None:
    _DELIVERED.set()
    if not _CTRL_C.is_set():
        _CTRL_C.set()
        threading.Thread(target=_insist, name="ctrl-c", daemon=True).start()
    signal.default_int_handler(signum, frame)


def _unraisable(report) -> None:
    """An interrupt that lands in a finalizer (`__del__`) is ignored there; after a Ctrl-C it is the
    person's own, and no traceback about it is printed (`_insist` sends it again)."""
    if not (_CTRL_C.is_set() and issubclass(report.exc_type, KeyboardInterrupt)):
        sys.__unraisablehook__(report)


def _unwinding(thread_id: int) -> bool:
    """Whether an exception is being handled in the thread: it runs an `except` or `finally` block or an
    `__exit__`, as while an interrupt unwinds it through the command's orderly stop."""
    handled = sys._current_exceptions().get(thread_id)
    return (handled[0] if isinstance(handled, tuple) else handled) is not None  # 3.11: exc_info; later: the exception


def _interrupt_lost(main_thread: int) -> bool:
    """Wait until the command ends (False) or looks to have lost the interrupt (True): its main thread ran
    on for CARRYING_ON_S with nothing unwinding it after the handler raised the interrupt, or INSIST_S passed."""
    deadline = time.monotonic() + INSIST_S
    carrying_on = 0.0
    while not _ENDED.wait(_POLL_S):
        # Counted from the handler's run: a signal waits while the main thread is in C code.
        carrying_on = carrying_on + _POLL_S if _DELIVERED.is_set() and not _unwinding(main_thread) else 0.0
        if carrying_on >= CARRYING_ON_S or time.monotonic() >= deadline:
            return True
    return False


def _insist() -> None:
    """Interrupt again while the command has not ended: a library may have taken the first interrupt for
    an error of its own and carried on (an optional import tried and skipped, a request retried), or it
    landed in a finalizer. Seen in the demo, under load, while it loaded its libraries and while it ingested."""
    main_thread = threading.main_thread().ident
    for _ in range(3):
        if not _interrupt_lost(main_thread):
            return
        _DELIVERED.clear()
        # A signal, not `_thread.interrupt_main`: it also ends a wait the main thread is blocked in.
        signal.pthread_kill(main_thread, signal.SIGINT)


def main() -> None:
    """The `stylestream` command: usage errors exit 2 (click says which option), anything else that
    goes wrong is one line and exit 1; STYLESTREAM_DEBUG=1 shows the traceback instead. Ctrl-C exits
    130, also when a library turned it into an error of its own (DuckDB interrupts its query)."""
    signal.signal(signal.SIGINT, _on_ctrl_c)
    sys.unraisablehook = _unraisable
    try:
        app()
    except Exception as e:
        _ENDED.set()
        if _CTRL_C.is_set():
            sys.exit(130)
        if os.environ.get("STYLESTREAM_DEBUG"):
            raise
        what = _headline(e)
        if not isinstance(e, BrokerError | clients.BrokerUnreachable):
            what = f"{type(e).__name__}: {what}"
        console.print(f"[red]error:[/] {what}", soft_wrap=True, highlight=False)
        console.print("(STYLESTREAM_DEBUG=1 shows the whole message and where it happened)", style="dim")
        sys.exit(1)
    finally:
        _ENDED.set()


if __name__ == "__main__":
    main()
