"""The `explainctl` command line: each command parses, calls the library, renders.

Errors are domain exceptions; `main` turns them into one line on stderr and an exit code.
"""

from __future__ import annotations

import dataclasses
import functools
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
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
# The config file and profile asked for before the command (--config, --profile), read
# by every Settings.load of this invocation.
_chosen: dict[str, str | None] = {"config": None, "profile": None}


def _print_version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            help="Config file (or EXPLAINCTL_CONFIG; default "
            "$XDG_CONFIG_HOME/explainctl/config.toml): settings under the environment.",
        ),
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option(
            "--profile",
            help="Use the profiles.NAME table of the config file (or EXPLAINCTL_PROFILE).",
        ),
    ] = None,
    version_: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    _chosen.update(config=config, profile=profile)


def _settings(**flags):
    from explainctl.config import Settings

    return Settings.load(config=_chosen["config"], profile=_chosen["profile"], **flags)


def _print_json(value: dict) -> None:
    print(json.dumps(value), flush=True)


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
    typer.Option(
        "--target",
        help="Class index or name to explain (default: top-1); `label`: each item's ground truth.",
    ),
]


def _target(text: str | None) -> Target:
    try:
        return Target.parse(text)
    except ValueError:
        raise InvalidInput(
            f"--target takes a class index >= 0, a class name, top1 or label, not {text!r}"
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
    images: Annotated[
        list[str],
        typer.Argument(
            help="Images, directories, lists of paths (.txt/.csv, @FILE), datasets (.parquet, "
            "a saved Hugging Face dataset, hf://datasets/..., .tar shards), or - (paths on "
            "stdin); local only."
        ),
    ],
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
    """Explain local images on this machine, writing OUT/<image>/ for each.

    Examples:

      explainctl explain cat.jpg dog.png --out results/

      explainctl explain photos/ --out results/ --model resnet50 --target tabby --json

      find shoots -name '*.png' | explainctl explain - --out results/ --iterations 100
    """
    params = params_from(method_flags)
    spec = build_model_spec(model, weights, mean, std)
    wanted = _target(target)
    items = _local_inputs(images)
    names = read_labels(labels)
    local_files, model_mod = _worker_side()
    loaded = model_mod.ModelCache().get(spec, model_mod.pick_device(device)).with_labels(names)

    failed = 0
    with _progress() as bar:
        task = bar.add_task("explaining", total=len(items) * params.iterations)
        outcomes = local_files.explain_paths(
            [item.uri for item in items],
            out,
            loaded,
            params,
            target=wanted,
            targets=[None if i.target is None else _target(i.target) for i in items],
            labels=[i.label for i in items],
            data=[i.data for i in items],
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


def _local_inputs(args: list[str]) -> list:
    """explain's arguments expanded as submit's are. This machine reads the images itself,
    so anything on S3 or the web is refused, argument or list entry, before a model loads."""
    from explainctl.inputs import expand_inputs

    for arg in args:
        _refuse_remote(arg.removeprefix("@"))
    items = list(expand_inputs(args, stdin=sys.stdin))
    for item in items:
        _refuse_remote(item.uri)
    if not items:
        raise InvalidInput(f"no images in {' '.join(args)}")
    return items


def _refuse_remote(text: str) -> None:
    from explainctl.io.uri import one_line, parse_uri
    from explainctl.spec.errors import ItemError

    try:
        scheme = parse_uri(text).scheme
    except ItemError:
        return  # not a URI at all: expand_inputs says what is wrong with it
    if scheme in ("s3", "http"):
        raise InvalidInput(
            f"explain reads local files only, not {one_line(text)}: queue it with "
            "`explainctl submit`"
        )


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
    from explainctl.local import embedded

    return Client(embedded.resolve(_settings(broker_url=broker, output=output, queue=queue)))


@app.command()
@with_method_options
def submit(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Images, directories, s3:// prefixes, lists of URIs (.txt/.csv, @FILE), "
            "datasets (.parquet, a saved Hugging Face dataset, hf://datasets/ORG/NAME/SPLIT, "
            ".tar shards; ?image=COL&label=COL&limit=N), or -."
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
    """Queue images for the workers; prints the job ID.

    Examples:

      explainctl submit photos/ --wait

      explainctl submit s3://audits/2026-11/ --model resnet50 --json

      explainctl submit audit.csv --chunk-size 32   (columns uri,target)

      ls shots/*.jpg | explainctl submit - --target tabby
    """
    from explainctl.inputs import expand_inputs

    params = params_from(method_flags)
    spec = build_model_spec(model, weights, mean, std)
    _target(target)
    names = read_labels(labels)
    client = _client(broker, output, queue)
    items = expand_inputs(inputs, stdin=sys.stdin)
    if target is not None:
        items = (
            i if i.target is not None else dataclasses.replace(i, target=target) for i in items
        )
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
    final = _watch(client, job_id, interval)
    if as_json:
        print(json.dumps(final.as_json()))
    else:
        counts = ", ".join(f"{n} {s}" for s, n in final.counts.items() if n)
        print(f"{final.job_id} {final.state}: {counts}")
    if check and (final.counts["failed"] or final.counts["cancelled"]):
        raise typer.Exit(1)


def _watch(client, job_id: str, interval: float = 1.0):
    """Follow a job with a progress bar on stderr until it ends; returns its last status."""
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
    return final


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
    parquet: Annotated[
        str | None,
        typer.Option(
            "--parquet",
            metavar="FILE",
            help="Write every column (results, URIs, artifact URIs, trust flags) to a "
            "parquet file, streamed.",
        ),
    ] = None,
    masks: Annotated[
        bool, typer.Option("--masks", help="With --parquet: each item's mask as a column.")
    ] = False,
) -> None:
    """List a job's items with their results or errors (JSON lines with --json)."""
    if sort is not None and sort not in SORT_KEYS:
        raise InvalidInput(f"--sort takes one of {', '.join(SORT_KEYS)}, not {sort!r}")
    if masks and parquet is None:
        raise InvalidInput("--masks goes with --parquet FILE")
    records = _client(broker, output).results(job)
    if state:
        records = (r for r in records if r.state == state)
    if sort:
        records = _sorted(list(records), sort, desc)
    if parquet is not None:
        from explainctl.exports.table import write_parquet
        from explainctl.jobs.masks import MaskReader

        rows = write_parquet(records, parquet, MaskReader() if masks else None)
        if as_json:
            _print_json({"job_id": job, "rows": rows, "parquet": parquet, "masks": masks})
        else:
            print(f"{rows} rows written to {parquet}")
        return
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
    as_json: JsonOpt = False,
) -> None:
    """Copy a job's artifacts to a local directory."""
    copied = _client(broker, output).download(job, directory)
    if as_json:
        _print_json({"job_id": job, "copied": copied, "directory": directory})
    else:
        print(f"copied {copied} files to {directory}")


@app.command()
def cancel(job: JobArg, broker: BrokerOpt = None, as_json: JsonOpt = False) -> None:
    """Stop a job: queued items are not run; finished ones are kept. A job that has
    already finished is left as it is."""
    cancelled = _client(broker).cancel(job)
    if as_json:
        _print_json({"job_id": job, "cancelled": cancelled.count, "finished": cancelled.finished})
    elif cancelled.finished:
        print(f"job {job} already finished ({cancelled.finished}): nothing to cancel")
    else:
        print(f"cancelled {cancelled.count} queued items of {job}")


@app.command()
def retry(
    job: JobArg,
    failed: Annotated[bool, typer.Option("--failed", help="Only failed items.")] = False,
    broker: BrokerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Queue a job's failed (and cancelled) items again."""
    count = _client(broker).retry(job, failed_only=failed)
    if as_json:
        _print_json({"job_id": job, "requeued": count})
    else:
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
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="A JSON line when the workers start and one when they stop (logs: stderr).",
        ),
    ] = False,
) -> None:
    """Run worker processes that explain queued chunks, restarting any that die (needs
    the worker extra)."""
    import importlib.util

    from explainctl.local import embedded

    settings = embedded.resolve(
        _settings(
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
    chosen = launcher.parse_gpus(gpus)
    if as_json:
        _print_json(
            {
                "event": "started",
                "broker": _where(settings.broker_url),
                "queue": settings.queue,
                "gpus": chosen,
                "device": "cuda" if chosen else settings.device,
                "preload": list(settings.preload),
                "metrics_port": settings.metrics_port or None,
            }
        )
    code = launcher.run_workers(settings, chosen, loglevel, name=name)
    if as_json:
        _print_json({"event": "stopped", "exit_code": code})
    raise typer.Exit(code)


def _where(url: str) -> str:
    """A broker URL without its password, for printing."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


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
    as_json: JsonOpt = False,
) -> None:
    """Write a job's self-contained HTML audit report: the findings over every item, and a
    gallery of the first --limit items that match --flag, --class and --state."""
    gallery = Gallery(flag=flag, class_name=class_name, state=state, limit=limit)
    written = _client(broker, output).report(job, out, gallery)
    if as_json:
        _print_json({"job_id": job, "report": written})
    else:
        print(written)


@app.command()
def export(
    job: JobArg,
    to: Annotated[str, typer.Option("--to", help="Where to: fiftyone.")] = "fiftyone",
    dataset: Annotated[
        str | None,
        typer.Option(help="FiftyOne dataset to create or extend (default explainctl-JOB)."),
    ] = None,
    media: Annotated[
        str | None,
        typer.Option(
            help="Where images not on this machine (s3://) are downloaded "
            "(default $EXPLAINCTL_HOME/media): FiftyOne reads local media only."
        ),
    ] = None,
    broker: BrokerOpt = None,
    output: OutputOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export a job to FiftyOne: one sample per item with its image, classes, saliency
    heatmap, every score and its trust flags as tags; exporting again updates it."""
    if to != "fiftyone":
        raise InvalidInput(f"--to takes fiftyone, not {to!r}")
    done = _client(broker, output).export_fiftyone(job, dataset, media)
    if as_json:
        _print_json({"job_id": job, **dataclasses.asdict(done)})
    else:
        print(f"{done.samples} samples of {job} in FiftyOne dataset {done.dataset!r} "
              f"(images downloaded: {done.downloaded}, to {done.media})")  # fmt: skip
        if done.without_media:
            print(f"{done.without_media} images could not be read", file=sys.stderr)


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
    as_json: JsonOpt = False,
) -> None:
    """Start the embedded Redis and local workers in the background."""
    from explainctl.local import embedded

    settings = embedded.resolve(_settings(device=device))
    running = embedded.running_workers(settings.home_dir)
    if not running:
        running = embedded.start_workers(workers, settings.environment(), settings.home_dir)
    log = settings.home_dir / "workers.log"
    if as_json:
        _print_json(
            {
                "broker": _where(settings.broker_url),
                "home": str(settings.home_dir),
                "workers": len(running),
                "log": str(log),
                "output": settings.output,
            }
        )
        return
    print(f"broker: {settings.broker_url.split('@')[-1]} (embedded under {settings.home_dir})")
    print(f"workers: {len(running)} running, log {log}")
    print(f"output: {settings.output}")


@app.command()
def down(as_json: JsonOpt = False) -> None:
    """Stop the local workers (warm) and the embedded Redis."""
    from explainctl.local import embedded

    settings = _settings()
    if embedded.running_workers(settings.home_dir):
        err.print("waiting for running chunks to finish (warm shutdown)...", highlight=False)
    # Long enough for a chunk to finish: a warm stop must not become a kill mid-chunk.
    stopped = embedded.stop_workers(settings.home_dir, timeout=settings.chunk_time_limit + 60)
    redis_stopped = embedded.stop_redis(settings.home_dir)
    if as_json:
        _print_json({"workers_stopped": stopped, "redis_stopped": redis_stopped})
    else:
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
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object at the end: the job and its report.")
    ] = False,
    method_flags: dict | None = None,
) -> None:
    """Explain the bundled example photos end to end and write the audit report.

    For a quick run on a laptop CPU: --iterations 50 --image-size 160, or a smaller
    --model such as resnet18.
    """
    from explainctl.local.demo import run_demo

    params = params_from(method_flags)
    spec = build_model_spec(model, weights, mean, std)
    settings = _settings(broker_url=broker, output=output)  # run_demo starts Redis
    # With --json the bar alone: the one JSON line comes at the end.
    follow = _watch if as_json else functools.partial(_follow, check=False)
    result = run_demo(settings, spec, params, follow, device)
    if as_json:
        _print_json(
            {
                "job_id": result.job_id,
                "state": result.state,
                "counts": result.counts,
                "report": result.report,
            }
        )
    else:
        print(f"report: {result.report}")
    if result.counts["failed"]:
        raise typer.Exit(1)


@app.command()
def version(as_json: JsonOpt = False) -> None:
    """Print the version (also: explainctl --version)."""
    if as_json:
        _print_json({"version": __version__, "python": sys.version.split()[0]})
    else:
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
