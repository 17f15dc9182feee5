"""The `explainctl` command line: each command parses, calls the library, renders.

Errors are domain exceptions; `main` turns them into one line on stderr and an exit code.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from explainctl import __version__
from explainctl.contracts import Substrate, Target
from explainctl.errors import ExplainctlError, MissingDependency
from explainctl.options import build_model_spec, build_params

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
TargetOpt = Annotated[
    str | None,
    typer.Option("--target", help="Class index or name to explain (default: top-1)."),
]
IterationsOpt = Annotated[int | None, typer.Option("--iterations", help="Default 500.")]
LrOpt = Annotated[float | None, typer.Option("--lr", help="Adam learning rate (0.1).")]
MaskSizeOpt = Annotated[int | None, typer.Option("--mask-size", help="Mask side (28).")]
ImageSizeOpt = Annotated[int | None, typer.Option("--image-size", help="Model input side (224).")]
L1Opt = Annotated[float | None, typer.Option("--l1-coeff", help="Weight of mean|1-m| (0.01).")]
TvOpt = Annotated[float | None, typer.Option("--tv-coeff", help="Weight of TV (0.2).")]
NoiseOpt = Annotated[float | None, typer.Option("--noise-std", help="Input noise sigma (0.2).")]
SubstrateOpt = Annotated[
    Substrate | None, typer.Option("--substrate", help="average, gaussian or median.")
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Seed of the noise (0).")]
EarlyStopOpt = Annotated[
    bool | None, typer.Option("--early-stop/--no-early-stop", help="Stop each mask early.")
]
ParamOpt = Annotated[
    list[str] | None,
    typer.Option("--param", help="Any other parameter as KEY=VALUE (repeatable)."),
]


def _worker_side():
    try:
        from explainctl_worker import explain, model
    except ImportError as error:
        raise MissingDependency(
            f"this command needs the worker extra (pip install 'explainctl[worker]'): {error}"
        ) from None
    return explain, model


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
def explain(
    images: Annotated[list[str], typer.Argument(help="Image files to explain.")],
    out: Annotated[str, typer.Option("--out", help="Directory for OUT/<image>/ artifacts.")],
    model: ModelOpt = "vgg19",
    weights: WeightsOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    target: TargetOpt = None,
    iterations: IterationsOpt = None,
    lr: LrOpt = None,
    mask_size: MaskSizeOpt = None,
    image_size: ImageSizeOpt = None,
    l1_coeff: L1Opt = None,
    tv_coeff: TvOpt = None,
    noise_std: NoiseOpt = None,
    substrate: SubstrateOpt = None,
    seed: SeedOpt = None,
    early_stop: EarlyStopOpt = None,
    param: ParamOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 8,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda[:N] or auto.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per image.")] = False,
) -> None:
    """Explain local images on this machine, writing OUT/<image>/ for each."""
    params = build_params(
        {
            "iterations": iterations,
            "lr": lr,
            "mask_size": mask_size,
            "image_size": image_size,
            "l1_coeff": l1_coeff,
            "tv_coeff": tv_coeff,
            "noise_std": noise_std,
            "substrate": substrate,
            "seed": seed,
            "early_stop": early_stop,
        },
        param,
    )
    spec = build_model_spec(model, weights, mean, std)
    wanted = Target.parse(target)
    explain_mod, model_mod = _worker_side()
    loaded = model_mod.ModelCache().get(spec, model_mod.pick_device(device))

    failed = 0
    with _progress() as bar:
        task = bar.add_task("explaining", total=len(images) * params.iterations)
        outcomes = explain_mod.explain_paths(
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
    r = outcome.result
    label = f"{r.target_index} {r.target_name}" if r.target_name else str(r.target_index)
    return (
        f"ok {outcome.name}: class {label}, p {r.prob_before:.3f} -> {r.prob_after:.3f}, "
        f"area {r.mask_area:.3f}, {r.seconds:.2f}s"
    )


@app.command()
def version() -> None:
    """Print the version."""
    print(__version__)


def main() -> None:
    try:
        # Without standalone mode click returns the code of typer.Exit instead of exiting.
        code = app(standalone_mode=False)
    except ExplainctlError as error:
        err.print(f"error: {error}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(error.exit_code)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted", highlight=False)
        sys.exit(130)
    except Exception as error:  # click usage errors carry their own exit code
        from click.exceptions import ClickException

        if isinstance(error, ClickException):
            error.show()
            sys.exit(error.exit_code)
        raise
    sys.exit(code if isinstance(code, int) else 0)
