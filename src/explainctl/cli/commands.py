"""The `explainctl` command line: each command parses, calls the library, renders.

Errors are domain exceptions; `main` turns them into one line on stderr and an exit code.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from explainctl import __version__
from explainctl.cli.options import (
    build_model_spec,
    params_from,
    setting_option,
    with_method_options,
)
from explainctl.labels import read_labels
from explainctl.pages.report import GALLERY_ITEMS, Gallery
from explainctl.spec.contracts import DEFAULT_CHUNK_SIZE, ITEM_STATES, TERMINAL_STATES, Target
from explainctl.spec.errors import (
    ExplainctlError,
    InvalidInput,
    MissingDependency,
)
from explainctl.spec.results import RESULT_COLUMNS, SORT_KEYS, sort_value, summary_line

app = typer.Typer(
    help="Explain image classifiers' decisions with meaningful-perturbation masks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)

# Options shared by every command that runs the method.
ModelOpt = Annotated[
    str,
    typer.Option("--model", help="torchvision model name, TorchScript file, or module:callable."),
]
WeightsOpt = Annotated[
    str | None, typer.Option("--weights", help="Local state-dict file (offline machines).")
]
MeanOpt = Annotated[
    str | None, typer.Option("--mean", help="Input normalisation mean, e.g. 0.5,0.5,0.5.")
]
StdOpt = Annotated[str | None, typer.Option("--std", help="Input normalisation std.")]
LabelsOpt = Annotated[
    str | None,
    typer.Option(
        "--labels",
        help="Class names for the model: one per line, or a JSON list (a path or s3://).",
    ),
]
TargetOpt = Annotated[
    str | None,
    typer.Option("--target", help="Class index or name to explain (default: top-1)."),
]


def _target(text: str | None) -> Target:
    try:
        return Target.parse(text)
    except ValueError:
        raise InvalidInput(
            f"--target takes a class index >= 0, a class name, or top1, not {text!r}"
        ) from None


def _worker_side():
    try:
        from explainctl_worker import local_files, model
    except ImportError as error:
        raise MissingDependency(
            f"this command needs the worker extra (pip install 'explainctl[worker]'): {error}"
        ) from None
    return local_files, model


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )


@app.command()
@with_method_options
def explain(
    images: Annotated[list[str], typer.Argument(help="Image files to explain.")],
    out: Annotated[str, typer.Option("--out", help="Directory for OUT/<image>/ artifacts.")],
    model: ModelOpt = "vgg19",
    weights: WeightsOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    target: TargetOpt = None,
    labels: LabelsOpt = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            min=1,
            help="Images in flight on the device (slots). Default: 4 on a CPU, "
            "as many as free memory holds on a GPU.",
        ),
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda[:N] or auto.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per image.")] = False,
    method_flags: dict | None = None,
) -> None:
    """Explain local images on this machine, writing OUT/<image>/ for each."""
    params = params_from(method_flags)
    spec = build_model_spec(model, weights, mean, std)
    wanted = _target(target)
    names = read_labels(labels)
    local_files, model_mod = _worker_side()
    loaded = model_mod.ModelCache().get(spec, model_mod.pick_device(device)).with_labels(names)

    failed = 0
    with _progress() as bar:
        task = bar.add_task("explaining", total=len(images) * params.iterations)
        outcomes = local_files.explain_paths(
            images,
            out,
            loaded,
            params,
            target=wanted,
            batch_size=batch_size,
            on_progress=lambda n: bar.advance(task, n),
        )
        for outcome in outcomes:
            failed += not outcome.ok
            if as_json:
                print(json.dumps(_outcome_json(outcome, out)), flush=True)
            else:
                print(_outcome_line(outcome), flush=True)
    if failed:
        raise typer.Exit(1)


def _outcome_json(outcome, out: str) -> dict:
    if outcome.ok:
        return {
            "item": outcome.name,
            "state": "done",
            "dir": f"{out.rstrip('/')}/{outcome.name}",
            **outcome.result.model_dump(mode="json"),
        }
    return {
        "item": outcome.name,
        "source": outcome.source,
        "state": "failed",
        "error_code": outcome.error_code,
        "error": outcome.error,
    }


def _outcome_line(outcome) -> str:
    if not outcome.ok:
        return f"FAILED {outcome.name}: {outcome.error} [{outcome.error_code}]"
    return f"ok {outcome.name}: {summary_line(outcome.result.scores())}"


BrokerOpt = Annotated[str | None, setting_option("broker_url")]
OutputOpt = Annotated[str | None, setting_option("output")]
QueueOpt = Annotated[str | None, setting_option("queue")]
DeviceOpt = Annotated[str | None, setting_option("device")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
JobArg = Annotated[str, typer.Argument(help="Job ID.")]


def _client(broker: str | None = None, output: str | None = None, queue: str | None = None):
    from explainctl.client import Client
    from explainctl.config import Settings
    from explainctl.local import embedded

    settings = Settings.load(broker_url=broker, output=output, queue=queue)
    return Client(embedded.resolve(settings))


@app.command()
@with_method_options
def submit(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Images, directories, s3:// prefixes, lists of URIs (.txt/.csv, @FILE), or -."
        ),
    ],
    model: ModelOpt = "vgg19",
    weights: WeightsOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    target: TargetOpt = None,
    labels: LabelsOpt = None,
    chunk_size: Annotated[
        int, typer.Option("--chunk-size", min=1, help="Images per chunk (one queue message).")
    ] = DEFAULT_CHUNK_SIZE,
    broker: BrokerOpt = None,
    output: OutputOpt = None,
    queue: QueueOpt = None,
    wait_: Annotated[bool, typer.Option("--wait", help="Follow the job until it ends.")] = False,
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            help="Finish queueing this interrupted job from the same inputs (its own model "
            "and parameters apply).",
        ),
    ] = None,
    as_json: JsonOpt = False,
    method_flags: dict | None = None,
) -> None:
    """Queue images for the workers; prints the job ID."""
    from explainctl.inputs import expand_inputs

    params = params_from(method_flags)
    spec = build_model_spec(model, weights, mean, std)
    _target(target)
    names = read_labels(labels)
    client = _client(broker, output, queue)
    items = expand_inputs(inputs, stdin=sys.stdin)
    if target is not None:
        items = (i if i.target is not None else type(i)(i.uri, target) for i in items)
    if resume is not None:
        done = client.resume(resume, items)
    else:
        done = client.submit(items, spec, params, chunk_size=chunk_size, labels=names)
    if as_json and wait_:
        pass  # the final status, printed by _follow, carries the job ID
    elif as_json:
        print(
            json.dumps(
                {
                    "job_id": done.job_id,
                    "total": done.total,
                    "chunks": done.chunks,
                    "output": done.output,
                }
            ),
            flush=True,
        )
    else:
        print(done.job_id, flush=True)
        err.print(
            f"queued {done.total} images in {done.chunks} chunks; output {done.output}",
            highlight=False,
        )
    if wait_:
        _follow(client, done.job_id, as_json=as_json)


@app.command()
def status(job: JobArg, broker: BrokerOpt = None, as_json: JsonOpt = False) -> None:
    """Show a job's state and a count of its items per state."""
    current = _client(broker).status(job)
    if as_json:
        print(json.dumps(current.as_json()))
        return
    counts = ", ".join(f"{n} {s}" for s, n in current.counts.items())
    print(f"{current.job_id} {current.state}: {counts} (of {current.total})")
    if current.state == "interrupted":
        print(
            f"its submit stopped after queueing {current.total} items: `explainctl submit "
            f"--resume {current.job_id} INPUT...` with the same inputs queues the rest"
        )


def _follow(
    client, job_id: str, as_json: bool = False, interval: float = 1.0, check: bool = True
) -> None:
    final = None
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]} failed"),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(job_id, total=None, failed=0, rate="")
        started, first_settled = time.monotonic(), None
        for current in client.watch(job_id, interval):
            settled = sum(current.counts[s] for s in TERMINAL_STATES)
            first_settled = settled if first_settled is None else first_settled
            elapsed = time.monotonic() - started
            rate = (settled - first_settled) / elapsed if elapsed > 0 else 0.0
            bar.update(
                task,
                total=current.total or None,
                completed=settled,
                failed=current.counts["failed"],
                rate=f"{rate:.2f} img/s",
            )
            final = current
    if as_json:
        print(json.dumps(final.as_json()))
    else:
        counts = ", ".join(f"{n} {s}" for s, n in final.counts.items() if n)
        print(f"{final.job_id} {final.state}: {counts}")
    if check and (final.counts["failed"] or final.counts["cancelled"]):
        raise typer.Exit(1)


@app.command()
def wait(
    job: JobArg,
    broker: BrokerOpt = None,
    interval: Annotated[float, typer.Option("--interval", min=0.05)] = 1.0,
    as_json: JsonOpt = False,
) -> None:
    """Follow a job with a progress bar; exits 1 if any item failed or was cancelled."""
    _follow(_client(broker), job, as_json=as_json, interval=interval)


# What makes a spreadsheet read a cell as a formula (or, tab and CR, shift it into one).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _inert_cell(cell: object) -> object:
    """A CSV cell a spreadsheet shows as text: a string that would start a formula (a class
    name or URI from the job: `=HYPERLINK(...)`) gets a leading single quote. Numbers stay
    numbers, negative ones included."""
    if isinstance(cell, str) and cell.startswith(_FORMULA_STARTS):
        return "'" + cell
    return cell


@app.command()
def results(
    job: JobArg,
    broker: BrokerOpt = None,
    output: OutputOpt = None,
    as_json: JsonOpt = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV with a header row.")] = False,
    state: Annotated[str | None, typer.Option("--state", help="Only items in this state.")] = None,
    sort: Annotated[
        str | None, typer.Option("--sort", help=f"Order by one of: {', '.join(SORT_KEYS)}.")
    ] = None,
    desc: Annotated[bool, typer.Option("--desc", help="Largest first.")] = False,
) -> None:
    """List a job's items with their results or errors (JSON lines with --json)."""
    if sort is not None and sort not in SORT_KEYS:
        raise InvalidInput(f"--sort takes one of {', '.join(SORT_KEYS)}, not {sort!r}")
    records = _client(broker, output).results(job)
    if state:
        records = (r for r in records if r.state == state)
    if sort:
        records = _sorted(list(records), sort, desc)
    if as_csv:
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow([*RESULT_COLUMNS, "artifacts"])
        for r in records:
            row = r.model_dump()
            artifacts = r.artifacts.get("overlay.png", "").rsplit("/", 1)[0]
            cells = [*("" if row[c] is None else row[c] for c in RESULT_COLUMNS), artifacts]
            writer.writerow([_inert_cell(cell) for cell in cells])
        return
    for r in records:
        if as_json:
            print(r.model_dump_json())
        elif r.state == "done":
            print(f"{r.index}\t{r.state}\t{r.uri}\t{summary_line(r.model_dump())}")
        else:
            detail = f"\t{r.error_code}: {r.error}" if r.error else ""
            print(f"{r.index}\t{r.state}\t{r.uri}{detail}")


def _sorted(records: list, key: str, desc: bool) -> list:
    """Items that have the key in the asked order, then those without it (failed ones)."""
    present = [r for r in records if sort_value(r, key) is not None]
    absent = [r for r in records if sort_value(r, key) is None]
    return sorted(present, key=lambda r: sort_value(r, key), reverse=desc) + absent


@app.command()
def download(
    job: JobArg,
    directory: Annotated[str, typer.Argument(help="Where to put <item>/ folders.")],
    broker: BrokerOpt = None,
    output: OutputOpt = None,
) -> None:
    """Copy a job's artifacts to a local directory."""
    copied = _client(broker, output).download(job, directory)
    print(f"copied {copied} files to {directory}")


@app.command()
def cancel(job: JobArg, broker: BrokerOpt = None) -> None:
    """Stop a job: queued items are not run; finished ones are kept. A job that has
    already finished is left as it is."""
    cancelled = _client(broker).cancel(job)
    if cancelled.finished:
        print(f"job {job} already finished ({cancelled.finished}): nothing to cancel")
    else:
        print(f"cancelled {cancelled.count} queued items of {job}")


@app.command()
def retry(
    job: JobArg,
    failed: Annotated[bool, typer.Option("--failed", help="Only failed items.")] = False,
    broker: BrokerOpt = None,
) -> None:
    """Queue a job's failed (and cancelled) items again."""
    count = _client(broker).retry(job, failed_only=failed)
    print(f"requeued {count} items of {job}")


@app.command()
def jobs(
    limit: Annotated[int, typer.Option("--limit", min=1)] = 20,
    broker: BrokerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Recent jobs, newest first."""
    for current in _client(broker).jobs(limit):
        if as_json:
            print(json.dumps(current.as_json()))
        else:
            stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(current.info.created))
            settled = sum(current.counts[s] for s in TERMINAL_STATES)
            print(
                f"{current.job_id}  {stamp}  {current.state:<24} {settled}/{current.total}"
                f"  {current.info.model.name}"
            )


@app.command()
def prune(broker: BrokerOpt = None, as_json: JsonOpt = False) -> None:
    """Forget jobs whose records and listing expired (EXPLAINCTL_JOB_TTL), now."""
    done = _client(broker).prune()
    if as_json:
        print(json.dumps(done))
    else:
        print(f"forgot {done['forgotten']} expired jobs; sealed {done['sealed']} finished ones")


@app.command()
def worker(
    device: DeviceOpt = None,
    gpus: Annotated[
        str | None,
        typer.Option(
            "--gpus", help="GPU indices (0,1) or all: one process each; none: one on the CPU."
        ),
    ] = None,
    queue: QueueOpt = None,
    preload: Annotated[list[str] | None, setting_option("preload")] = None,
    broker: BrokerOpt = None,
    metrics_port: Annotated[int | None, setting_option("metrics_port")] = None,
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            help="Node name (NAME@HOST); default explain-<Slurm job or PID>@<host>, unique "
            "per host and process.",
        ),
    ] = None,
    loglevel: Annotated[str, typer.Option("--loglevel")] = "INFO",
) -> None:
    """Run worker processes that explain queued chunks, restarting any that die (needs
    the worker extra)."""
    import importlib.util

    from explainctl.config import Settings
    from explainctl.local import embedded

    settings = embedded.resolve(
        Settings.load(
            broker_url=broker,
            queue=queue,
            device=device,
            preload=tuple(preload) if preload else None,
            metrics_port=metrics_port,
        )
    )
    if importlib.util.find_spec("torch") is None:
        raise MissingDependency("workers need the worker extra: pip install 'explainctl[worker]'")
    try:
        from explainctl.local import launcher
    except ImportError as error:
        raise MissingDependency(
            f"workers need the worker extra (pip install 'explainctl[worker]'): {error}"
        ) from None
    raise typer.Exit(launcher.run_workers(settings, launcher.parse_gpus(gpus), loglevel, name=name))


@app.command()
def report(
    job: JobArg,
    out: Annotated[
        str | None, typer.Option("--out", help="HTML file (default: next to the artifacts).")
    ] = None,
    flag: Annotated[
        str | None,
        typer.Option(help=f"Gallery: only items with this flag: {', '.join(Gallery.FLAGS)}."),
    ] = None,
    class_name: Annotated[
        str | None, typer.Option("--class", help="Gallery: only items of this class.")
    ] = None,
    state: Annotated[
        str | None,
        typer.Option(help=f"Gallery: only items in this state: {', '.join(ITEM_STATES)}."),
    ] = None,
    limit: Annotated[
        int, typer.Option(help="Gallery: the most items it shows (the first by index).")
    ] = GALLERY_ITEMS,
    broker: BrokerOpt = None,
    output: OutputOpt = None,
) -> None:
    """Write a job's self-contained HTML audit report: the findings over every item, and a
    gallery of the first --limit items that match --flag, --class and --state."""
    gallery = Gallery(flag=flag, class_name=class_name, state=state, limit=limit)
    print(_client(broker, output).report(job, out, gallery))


@app.command()
def compare(
    job_a: Annotated[str, typer.Argument(help="Job ID of A.")],
    job_b: Annotated[str, typer.Argument(help="Job ID of B.")],
    out: Annotated[
        str | None,
        typer.Option("--out", help="HTML file (default: compare-A-B.html in this directory)."),
    ] = None,
    broker: BrokerOpt = None,
    output: OutputOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per pair, then a summary.")
    ] = False,
) -> None:
    """Compare two jobs item by item (paired by URI): classes, probabilities, mask areas
    and mask agreement, as a self-contained HTML page."""
    from explainctl.pages.compare import write_page
    from explainctl.pages.comparison import compare_jobs

    if as_json and out:
        raise InvalidInput("--json prints the pairs and --out writes the page: give one")
    comparison = compare_jobs(_client(broker, output), job_a, job_b)
    if not as_json:
        print(write_page(comparison, out))
        return
    for entry in comparison:
        print(json.dumps(entry.as_json()), flush=True)
    print(json.dumps(comparison.summary.as_json()), flush=True)


@app.command()
def up(
    workers: Annotated[int, typer.Option("--workers", min=1, help="Local workers to start.")] = 1,
    device: DeviceOpt = None,
) -> None:
    """Start the embedded Redis and local workers in the background."""
    from explainctl.config import Settings
    from explainctl.local import embedded

    settings = embedded.resolve(Settings.load(device=device))
    running = embedded.running_workers(settings.home_dir)
    if not running:
        running = embedded.start_workers(workers, settings.environment(), settings.home_dir)
    print(f"broker: {settings.broker_url.split('@')[-1]} (embedded under {settings.home_dir})")
    print(f"workers: {len(running)} running, log {settings.home_dir / 'workers.log'}")
    print(f"output: {settings.output}")


@app.command()
def down() -> None:
    """Stop the local workers (warm) and the embedded Redis."""
    from explainctl.config import Settings
    from explainctl.local import embedded

    settings = Settings.load()
    if embedded.running_workers(settings.home_dir):
        err.print("waiting for running chunks to finish (warm shutdown)...", highlight=False)
    # Long enough for a chunk to finish: a warm stop must not become a kill mid-chunk.
    stopped = embedded.stop_workers(settings.home_dir, timeout=settings.chunk_time_limit + 60)
    root = settings.home_dir
    redis_stopped = embedded.stop_redis(root)
    print(f"stopped {stopped} workers" + (" and the embedded Redis" if redis_stopped else ""))


@app.command()
@with_method_options
def demo(
    model: ModelOpt = "vgg19",
    weights: WeightsOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    device: DeviceOpt = None,
    broker: BrokerOpt = None,
    output: OutputOpt = None,
    method_flags: dict | None = None,
) -> None:
    """Explain the bundled example photos end to end and write the audit report.

    For a quick run on a laptop CPU: --iterations 50 --image-size 160, or a smaller
    --model such as resnet18.
    """
    from explainctl.config import Settings
    from explainctl.local.demo import run_demo

    params = params_from(method_flags)
    spec = build_model_spec(model, weights, mean, std)
    settings = Settings.load(broker_url=broker, output=output)  # run_demo starts Redis
    result = run_demo(settings, spec, params, lambda c, j: _follow(c, j, check=False), device)
    print(f"report: {result.report}")
    if result.counts["failed"]:
        raise typer.Exit(1)


@app.command()
def version() -> None:
    """Print the version."""
    print(__version__)


def _usage_error(error: Exception) -> bool:
    # Typer carries its own copy of click, so its usage errors are recognised by shape.
    return hasattr(error, "format_message") and isinstance(getattr(error, "exit_code", None), int)


def main() -> None:
    try:
        # Without standalone mode click returns the code of typer.Exit instead of exiting,
        # and leaves usage errors to us, so they too are one line.
        code = app(standalone_mode=False)
    except ExplainctlError as error:
        err.print(f"error: {error}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        err.print("aborted", highlight=False)
        sys.exit(130)
    except Exception as error:
        if _usage_error(error):
            err.print(
                f"error: {error.format_message()} (see --help)",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
            sys.exit(error.exit_code)
        if os.environ.get("EXPLAINCTL_DEBUG"):
            raise
        # A bug, not a user error: one line here; EXPLAINCTL_DEBUG=1 shows the traceback.
        first = str(error).splitlines()[0] if str(error) else ""
        err.print(
            f"error: internal error {type(error).__name__}: {first} "
            "(set EXPLAINCTL_DEBUG=1 for details)",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        sys.exit(70)
    sys.exit(code if isinstance(code, int) else 0)
