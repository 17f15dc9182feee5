"""The Python API for notebooks: the light side, which validates and forwards.

Arguments are checked here, with the same contracts and one-line errors as the CLI
(ExplainParams, ModelSpec, Target); the work runs in `explainctl_worker.notebook`, which
is imported only when a call needs torch, so `import explainctl` stays light. The job side
(`Client`, `Job`) is a notebook's face on `explainctl.client.Client` and needs no torch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from explainctl.cli.options import build_params, model_spec_of, validated
from explainctl.spec.contracts import DEFAULT_CHUNK_SIZE, GROUND_TRUTH, ModelSpec, Target
from explainctl.spec.errors import InvalidInput, MissingDependency

Triple = Sequence[float]


def frame(rows: list[dict[str, Any]], columns: Sequence[str]):
    """`rows` as a pandas DataFrame when pandas is installed (nullable dtypes, so a class
    index stays an integer where other rows have none), else a pyarrow Table."""
    try:
        import pandas
    except ImportError:
        pass
    else:
        return pandas.DataFrame(rows, columns=list(columns)).convert_dtypes()
    try:
        import pyarrow
    except ImportError:
        raise MissingDependency("a table needs pandas or pyarrow (pip install pandas)") from None
    return pyarrow.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows])


def _worker():
    try:
        from explainctl_worker import notebook
    except ImportError as error:
        raise MissingDependency(
            f"this call runs the model, which needs the worker extra "
            f"(pip install 'explainctl[worker]'): {error}"
        ) from None
    return notebook


def _triple(values: Triple | None, what: str) -> tuple[float, float, float] | None:
    if values is None:
        return None
    try:
        triple = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise InvalidInput(f"{what} must be three numbers, got {values!r}") from None
    if len(triple) != 3:
        raise InvalidInput(f"{what} must be three numbers, got {values!r}")
    return triple  # type: ignore[return-value]


def model_spec(
    name: str, weights: str | None = None, mean: Triple | None = None, std: Triple | None = None
) -> ModelSpec:
    """The ModelSpec of a spec string, as `--model/--weights/--mean/--std` build it."""
    return model_spec_of(name, weights, _triple(mean, "mean"), _triple(std, "std"))


def _labels(labels: str | os.PathLike | Sequence[str] | None) -> tuple[str, ...] | None:
    """Class names: a list of them, or a labels file (a path or s3://) as `--labels`."""
    if labels is None:
        return None
    if isinstance(labels, str | os.PathLike):
        from explainctl.labels import read_labels

        return read_labels(os.fspath(labels))
    names = tuple(str(name) for name in labels)
    if not names:
        raise InvalidInput("labels must name at least one class")
    return names


def params_of(method: str | None, params: dict[str, Any]):
    """ExplainParams from keyword arguments, checked as the CLI checks its flags."""
    if method is not None:
        params = {**params, "method": method}
    return build_params(params)


def targets_of(target: Any, count: int | None = None) -> list[Target] | Target:
    """One Target for all items (None = top-1, a class index, a class name), or one per
    item from a sequence of them (`count` long, when known)."""
    if target is None or isinstance(target, int | str):
        return _one_target(target)
    if hasattr(target, "tolist"):  # numpy arrays and torch tensors
        target = target.tolist()
        if not isinstance(target, list):
            return _one_target(target)
    targets = [_one_target(t) for t in target]
    if count is not None and len(targets) != count:
        raise InvalidInput(f"{len(targets)} targets given for {count} images")
    return targets


def _one_target(value: Any) -> Target:
    if value is None:
        return Target()
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidInput(f"a target is a class index or a class name, not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise InvalidInput(f"a target class index is >= 0, not {value}")
        return Target(index=value)
    return Target.parse(value)


def _is_module(model: Any) -> bool:
    # Tested by duck type so that this side never imports torch to ask.
    return callable(model) and hasattr(model, "parameters") and hasattr(model, "eval")


def _loaded(model, *, weights, mean, std, labels, device, bare_defaults: bool):
    """The worker's LoadedModel for a spec string, an nn.Module, or a model already
    loaded; `bare_defaults` lets a bare module go unnormalised (mean 0, std 1)."""
    notebook = _worker()
    names = _labels(labels)
    if isinstance(model, notebook.LoadedModel):
        if weights is not None or mean is not None or std is not None:
            raise InvalidInput("weights, mean and std belong to load_model, not to a loaded model")
        return notebook.placed(model.with_labels(names), device)
    if isinstance(model, str | os.PathLike):
        spec = model_spec(os.fspath(model), weights, mean, std)
        return notebook.load_model(spec, names, device)
    if not _is_module(model):
        raise InvalidInput(
            f"model must be a spec string, an nn.Module or load_model()'s result, "
            f"not {type(model).__name__}"
        )
    if weights is not None:
        raise InvalidInput("weights= is for spec strings; load them into your module yourself")
    if (mean is None or std is None) and not bare_defaults:
        # A forgotten normalisation gives explanations that look right and are not.
        raise InvalidInput(
            "a bare nn.Module needs mean= and std= (its input normalisation; "
            "mean=(0, 0, 0), std=(1, 1, 1) if the module normalises its inputs itself)"
        )
    spec = validated(
        ModelSpec,
        {
            "name": f"<{type(model).__module__}.{type(model).__qualname__}>",
            "mean": _triple(mean, "mean") or (0.0, 0.0, 0.0),
            "std": _triple(std, "std") or (1.0, 1.0, 1.0),
        },
    )
    return notebook.wrap_module(model, spec, names, device)


def load_model(
    spec: str,
    *,
    weights: str | None = None,
    mean: Triple | None = None,
    std: Triple | None = None,
    labels: str | Sequence[str] | None = None,
    device: str | None = None,
):
    """Load a classifier as `explainctl explain --model SPEC` does.

    Args:
        spec: a torchvision model name (`resnet18`), a TorchScript or `.pt2` file, or
            `module:callable` returning an nn.Module, and whatever other spec the CLI's
            `--model` takes.
        weights: a local state-dict file (offline machines), as `--weights`.
        mean, std: the input normalisation (three numbers each); default the model's own
            (ImageNet's for a model without a configuration of its own).
        labels: class names, a list or a labels file (as `--labels`); default: the
            model's own, where it has them.
        device: `cpu`, `cuda[:N]` or None (CUDA when present).

    Returns:
        The loaded model (eval mode, frozen), to pass to `explain` or `Attribution`;
        `.module` is the nn.Module, `.categories` its class names.
    """
    return _loaded(
        spec, weights=weights, mean=mean, std=std, labels=labels, device=device,
        bare_defaults=False,
    )  # fmt: skip


def explain(
    model,
    images,
    *,
    method: str | None = None,
    target: Any = None,
    device: str | None = None,
    batch_size: int | None = None,
    weights: str | None = None,
    mean: Triple | None = None,
    std: Triple | None = None,
    labels: str | Sequence[str] | None = None,
    **params: Any,
):
    """Explain images with the engine of `explainctl explain`: same image, seed and
    parameters, same mask.

    Args:
        model: a spec string (as `load_model`), `load_model`'s result, or an nn.Module you
            hold (then `mean` and `std` are required: its input normalisation).
        images: one image or a list of them: file paths, PIL images, numpy arrays (H, W, 3)
            as uint8 0-255 or float 0-1, or a torch tensor batch (N, 3, H, W) with values
            in 0-1. Each is resized to `image_size` square for the model, as the CLI does.
        method: the method (default: the CLI's); `**params` are its parameters by name
            (`iterations=100`, `seed=1`, ...), checked as the CLI's flags are.
        target: None (each image's top-1 class), a class index or name for all, or a
            sequence with one per image.
        device: `cpu`, `cuda[:N]`; default: the model's own (a spec: CUDA when present).
        batch_size: images in flight on the device at once (the CLI's `--batch-size`).

    Returns:
        An `ExplainResult`: `.masks` (N, h, w), `.saliency` per image at its own size,
        `.table()`, `.predictions`, `.failed`, `.save(dir)`. A bad image fails alone.
    """
    checked = params_of(method, params)
    loaded = _loaded(
        model, weights=weights, mean=mean, std=std, labels=labels, device=device,
        bare_defaults=False,
    )  # fmt: skip
    notebook = _worker()
    inputs = notebook.as_images(images)
    return notebook.explain(
        loaded, inputs, targets_of(target, len(inputs)), checked, batch_size=batch_size
    )


class Attribution:
    """Captum's shape for explainctl's masks: `Attribution(model).attribute(inputs, target)`.

    `model` is an nn.Module called on the inputs as given, as Captum's forward_func is
    (pass `mean`/`std` when the module expects normalised inputs and you hold pixels), a
    spec string, or `load_model`'s result. `**params` are the method's parameters; by
    default `image_size` is the inputs' side when they are square, so the mask is
    optimised on the pixels given.
    """

    def __init__(
        self,
        model,
        *,
        method: str | None = None,
        mean: Triple | None = None,
        std: Triple | None = None,
        labels: str | Sequence[str] | None = None,
        device: str | None = None,
        batch_size: int | None = None,
        **params: Any,
    ):
        self.params = dict(params)
        self.method = method
        params_of(method, self.params)  # fail now, not at the first attribute()
        self.batch_size = batch_size
        self.model = _loaded(
            model, weights=None, mean=mean, std=std, labels=labels, device=device,
            bare_defaults=True,
        )  # fmt: skip

    def _params_for(self, shape: Sequence[int]):
        values = dict(self.params)
        if "image_size" not in values and len(shape) == 4 and shape[2] == shape[3]:
            values["image_size"] = int(shape[2])
        return params_of(self.method, values)

    def attribute(self, inputs, target: Any = None):
        """Attributions of `inputs` (N, 3, H, W), pixel values in 0-1, for `target` (None:
        each input's top-1 class; an index for all; a sequence or tensor, one per input).

        Returns (N, 1, H, W), the saliency 1 - mask upsampled to (H, W): 1 where deleting
        the pixel destroyed the class's evidence, 0 where the mask left it alone; a torch
        tensor on the inputs' device (a numpy array for numpy inputs).
        """
        shape = tuple(getattr(inputs, "shape", ()))
        targets = targets_of(target, shape[0] if shape else None)
        return _worker().attribute(
            self.model, inputs, targets, self._params_for(shape), batch_size=self.batch_size
        )


def explain_func(model, inputs, targets, **kwargs: Any):
    """An explanation function as Quantus calls it: `explain_func(model, inputs, targets,
    **explain_func_kwargs)`.

    `inputs` (N, 3, H, W) numpy float, pixel values in 0-1 (values outside are clipped:
    Quantus' own noise steps beyond them); `targets` (N,) class indices; the model is
    called on the inputs as given unless `mean`/`std` are among the kwargs; the other
    kwargs are `device`, `batch_size`, `method` and the method's parameters.

    Returns (N, 1, H, W) float32 numpy: the saliency 1 - mask at the input's size.
    """
    device = kwargs.pop("device", None)
    attribution = Attribution(
        model,
        device=None if device is None else str(device),
        **kwargs,
    )
    return _worker().attribute(
        attribution.model,
        inputs,
        targets_of(targets, len(inputs)),
        attribution._params_for(tuple(inputs.shape)),
        batch_size=attribution.batch_size,
        clip=True,
    )


def example_images() -> list[str]:
    """Paths of the example photos bundled with explainctl (a cat, a mug, a rocket)."""
    from explainctl.local.demo import example_images as bundled

    return bundled()


# --- The job side -------------------------------------------------------------------


class Client:
    """Jobs on the queue from a notebook: `Client().submit(images, model=...)` returns a
    `Job`. Settings come from the environment and defaults, as the CLI's (Settings.load);
    keyword arguments override them (`broker_url`, `output`, `queue`, ...). With no broker
    configured, the embedded one of this machine is used, as `explainctl submit` does."""

    def __init__(self, **settings: Any):
        from explainctl.client import Client as Library
        from explainctl.config import Settings
        from explainctl.local import embedded

        self.library = Library(embedded.resolve(Settings.load(**settings)))

    def submit(
        self,
        images: str | Iterable[str],
        *,
        model: str = "vgg19",
        weights: str | None = None,
        mean: Triple | None = None,
        std: Triple | None = None,
        labels: str | Sequence[str] | None = None,
        target: int | str | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        method: str | None = None,
        **params: Any,
    ) -> Job:
        """Queue a job, as `explainctl submit` does: `images` are paths, directories,
        s3:// prefixes or URIs, or list files (the same arguments); `model` a spec string
        the workers load; `target` one class for every image (None: each one's top-1)."""
        from explainctl.inputs import InputItem, expand_inputs

        checked = params_of(method, params)
        spec = model_spec(model, weights, mean, std)
        wanted = _one_target(target)
        items: Iterator[InputItem] = expand_inputs(
            [images] if isinstance(images, str) else list(images)
        )
        if target is not None:
            text = str(wanted.index) if wanted.index is not None else wanted.name
            text = GROUND_TRUTH if wanted.ground_truth else text
            items = (
                i if i.target is not None else dataclasses.replace(i, target=text) for i in items
            )
        done = self.library.submit(
            items, spec, checked, chunk_size=chunk_size, labels=_labels(labels)
        )
        return Job(self, done.job_id)

    def job(self, job_id: str) -> Job:
        """The handle of a job submitted earlier."""
        return Job(self, job_id)


class Job:
    """One queued job: `.status()`, `.wait()`, `.results()`, `.report(path)`."""

    def __init__(self, client: Client, job_id: str):
        self.client, self.id = client, job_id

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self):
        """The job's JobStatus: `.state`, `.counts` per item state, `.total`."""
        return self.client.library.status(self.id)

    def wait(self, interval: float = 1.0):
        """Block until the job settles; returns its final JobStatus. It also requeues the
        chunks of workers that died meanwhile, as `explainctl wait` does."""
        final = None
        for final in self.client.library.watch(self.id, interval):  # noqa: B007
            pass
        return final

    def results(self):
        """One row per item, the columns of `explainctl results --parquet`
        (explainctl.exports.table.COLUMNS): index, URI, state, every result field, error code
        and message, artifact URIs, trust flags; a pandas DataFrame, else pyarrow."""
        from explainctl.exports.table import COLUMNS, rows

        return frame(list(rows(self.client.library.results(self.id))), COLUMNS)

    def to_parquet(self, path: str | os.PathLike, masks: bool = False) -> int:
        """Write the job's table to a parquet file, streamed, as `explainctl results JOB
        --parquet FILE [--masks]`; returns the rows written."""
        from explainctl.exports.table import write_parquet
        from explainctl.jobs.masks import MaskReader

        records = self.client.library.results(self.id)
        return write_parquet(records, os.fspath(path), MaskReader() if masks else None)

    def report(self, path: str | None = None) -> str:
        """Write the HTML audit report to `path` (default: next to the artifacts);
        returns where it went."""
        return self.client.library.report(self.id, path)

    def download(self, directory: str) -> int:
        """Copy the job's artifacts into DIRECTORY/<item>/; returns the files copied."""
        return self.client.library.download(self.id, directory)
