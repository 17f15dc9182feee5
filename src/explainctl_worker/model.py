"""Loading the classifier named by a ModelSpec, once per process.

A spec is one of the forms explainctl.spec.models parses: a timm or Hugging Face name
(timm_models.py, hf_models.py), a local file (TorchScript, torch.export) or directory
(save_pretrained), `module:callable` returning an `nn.Module`, or a torchvision
classification model name. Each comes with how its inputs are prepared (ResolvedModel)
and its class names where it has them. Loaded models are frozen (no weight gradients)
and in eval mode.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import ValidationError
from torch import nn

from explainctl.spec.contracts import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelSpec,
    ResolvedModel,
    Target,
)
from explainctl.spec.errors import InvalidInput, ModelUnavailable
from explainctl.spec.methods import ExplainParams
from explainctl.spec.models import parse_model
from explainctl_worker.weights import load_weights


@dataclass
class LoadedModel:
    module: nn.Module
    spec: ModelSpec
    device: torch.device
    categories: list[str] | None  # class names by index, when the model has them
    # Where it came from and how inputs are prepared for it: the model's own configuration
    # with the spec's mean/std over it (none given: ImageNet's, 224 px, bilinear).
    resolved: ResolvedModel | None = None

    def __post_init__(self) -> None:
        own = self.resolved or ResolvedModel(source="module")
        given = {"mean": self.spec.mean, "std": self.spec.std}
        self.resolved = own.model_copy(
            update={
                **{key: value for key, value in given.items() if value is not None},
                "labels": own.labels or ("model" if self.categories else None),
            }
        )

    def with_labels(self, labels: Sequence[str] | None) -> LoadedModel:
        """The same module with a job's own class names (--labels) in place of its own."""
        if not labels:
            return self
        named = dataclasses.replace(
            self,
            categories=list(labels),
            resolved=self.resolved.model_copy(update={"labels": "job"}),
        )
        # The output-width probe (explain.num_classes) is the module's: share it.
        named.__dict__["_num_classes"] = self.__dict__.setdefault("_num_classes", {})
        return named

    def prepare(self, params: ExplainParams) -> tuple[ExplainParams, ResolvedModel]:
        """`params` with the input size filled in (--image-size, else the model's own) and
        the preprocessing that size completes; InvalidInput where the parameters do not
        fit the model's size (a mask larger than the input)."""
        size = params.image_size or self.resolved.image_size
        resolved = self.resolved.model_copy(update={"image_size": size})
        if params.image_size == size:
            return params, resolved
        try:
            params = ExplainParams(**{**params.model_dump(), "image_size": size})
        except ValidationError as error:
            reason = error.errors()[0]["msg"].removeprefix("Value error, ")
            raise InvalidInput(f"at the model's input size {size}: {reason}") from None
        return params, resolved


def _freeze(module: nn.Module, device: torch.device) -> nn.Module:
    module = module.to(device).eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def _torchvision_model(spec: ModelSpec):
    from torchvision import models

    weights_enum = models.get_model_weights(spec.name)
    default = weights_enum.DEFAULT
    categories = list(default.meta.get("categories") or []) or None
    resolved = _torchvision_resolved(default)
    if spec.weights:
        module = load_weights(models.get_model(spec.name, weights=None), spec.weights)
        return module, resolved, categories
    try:
        module = models.get_model(spec.name, weights=default)
    except (OSError, RuntimeError) as error:
        raise _download_failed(spec, error) from None
    return module, resolved, categories


def _torchvision_resolved(weights) -> ResolvedModel:
    """The input size, statistics and resampling of the weights' own eval transform."""
    transform = weights.transforms()
    crop = getattr(transform, "crop_size", None)
    mode = getattr(transform, "interpolation", None)
    return ResolvedModel(
        source="torchvision",
        image_size=int(crop[0]) if crop else 224,
        mean=tuple(getattr(transform, "mean", None) or IMAGENET_MEAN),
        std=tuple(getattr(transform, "std", None) or IMAGENET_STD),
        interpolation=getattr(mode, "value", "bilinear"),
    )


def _download_failed(spec: ModelSpec, error: Exception) -> ModelUnavailable:
    # OSError covers URLError and socket errors: no network, or a proxy that refuses.
    reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
    return ModelUnavailable(
        f"cannot download the weights of {spec.name} ({reason}); pass --weights PATH "
        "to a local state dict, or choose another --model"
    )


def _callable_model(spec: ModelSpec) -> nn.Module:
    module_name, _, attribute = spec.name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ModelUnavailable(f"cannot import model {spec.name}: {error}") from None
    module = factory()
    if not isinstance(module, nn.Module):
        raise ModelUnavailable(f"{spec.name} returned {type(module).__name__}, not an nn.Module")
    if spec.weights:
        load_weights(module, spec.weights)
    return module


class _Exported(nn.Module):
    """Holds an exported program's module, which refuses `.eval()`; it is traced already."""

    def __init__(self, program_module: nn.Module):
        super().__init__()
        for parameter in program_module.parameters():
            parameter.requires_grad_(False)
        # Not registered as a child, so `.eval()`/`.to()` on this wrapper do not reach it.
        object.__setattr__(self, "_program", program_module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._program(x)


def _file_model(path: str) -> nn.Module:
    """A TorchScript archive, or a torch.export program (`.pt2`)."""
    try:
        if path.endswith(".pt2"):
            return _Exported(torch.export.load(path).module())
        with warnings.catch_warnings():
            # TorchScript is deprecated upstream but is what many users have on disk.
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(path, map_location="cpu")
    except Exception as error:  # any unreadable file is the same failure
        kind = "torch.export program" if path.endswith(".pt2") else "TorchScript model"
        raise ModelUnavailable(f"{path} is not a {kind}: {type(error).__name__}") from None


def ensure_weights(spec: ModelSpec) -> None:
    """Download a torchvision model's weights into torch's cache unless they are there,
    so a missing network shows up as one ModelUnavailable line before any work starts."""
    from torchvision import models

    if spec.weights or os.path.exists(spec.name) or parse_model(spec.name).kind != "local":
        return
    if spec.name not in models.list_models(module=models):
        raise ModelUnavailable(f"unknown model {spec.name!r}")
    try:
        models.get_model_weights(spec.name).DEFAULT.get_state_dict(progress=False)
    except (OSError, RuntimeError) as error:
        raise _download_failed(spec, error) from None


def _directory_model(spec: ModelSpec):
    """A directory `save_pretrained` wrote: timm's (its config.json names an
    `architecture`) or transformers' (a `model_type`)."""
    path = spec.name
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as file:
            config = json.load(file)
    except (OSError, ValueError) as error:
        raise ModelUnavailable(
            f"{path} is not a saved model: no readable config.json ({type(error).__name__})"
        ) from None
    if isinstance(config, dict) and "architecture" in config:
        from explainctl_worker import timm_models

        return timm_models.load(f"local-dir:{path}", spec, source="timm")
    if isinstance(config, dict) and ("model_type" in config or "architectures" in config):
        from explainctl_worker import hf_models

        return hf_models.load(path, spec, source="hf")
    raise ModelUnavailable(f"{path}: config.json is neither timm's nor transformers'")


def _load(spec: ModelSpec, device: torch.device) -> LoadedModel:
    from torchvision import models

    source = parse_model(spec.name)
    categories, resolved = None, None
    if source.kind == "timm":
        from explainctl_worker import timm_models

        module, resolved, categories = timm_models.load(source.name, spec, source.revision)
    elif source.kind == "hf":
        from explainctl_worker import hf_models

        module, resolved, categories = hf_models.load(source.name, spec, source.revision)
    elif os.path.isdir(spec.name):
        module, resolved, categories = _directory_model(spec)
    elif os.path.isfile(spec.name):
        module, resolved = _file_model(spec.name), ResolvedModel(source="file")
    elif source.kind == "callable":
        module, resolved = _callable_model(spec), ResolvedModel(source="callable")
    elif spec.name in models.list_models(module=models):
        module, resolved, categories = _torchvision_model(spec)
    else:
        raise ModelUnavailable(
            f"unknown model {spec.name!r}: use a torchvision classification model name, "
            "timm:NAME, hf-hub:ORG/NAME, hf:ORG/NAME, a model file or directory, "
            "or module:callable"
        )
    return LoadedModel(_freeze(module, device), spec, device, categories, resolved)


class ModelCache:
    """Keeps the last `capacity` loaded models of this process (one GPU holds few)."""

    def __init__(self, capacity: int = 2):
        self.capacity = capacity
        self._models: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, spec: ModelSpec, device: torch.device | str) -> LoadedModel:
        device = torch.device(device)
        key = (spec, str(device))
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            loaded = _load(spec, device)
            self._models[key] = loaded
            while len(self._models) > self.capacity:
                self._models.popitem(last=False)
            return loaded


def resolve_target(target: Target, categories: list[str] | None, num_classes: int | None = None):
    """The class index a Target names, or None for top-1."""
    if target.index is not None:
        if num_classes is not None and target.index >= num_classes:
            raise InvalidInput(
                f"target class {target.index} is out of range (model has {num_classes})"
            )
        return target.index
    if target.name is None:
        return None
    if not categories:
        raise InvalidInput(
            f"target {target.name!r} given by name, but the model has no class names"
        )
    wanted = target.name.strip().lower()
    for index, name in enumerate(categories):
        if name.lower() == wanted:
            return index
    raise InvalidInput(f"unknown class name {target.name!r}")


def resolve_label(
    label: str | None, categories: list[str] | None, num_classes: int | None = None
) -> int | None:
    """The class index a ground-truth label names, matched as `--target` is (an index, or
    a class name in any case); None where it names no class: an item is still explained
    without its ground truth, and its record keeps the label as given."""
    if label is None or not label.strip() or label.strip().lower() == "top1":
        return None  # "top1" is a target's word for the prediction, never a class
    try:
        return resolve_target(Target.parse(label), categories, num_classes)
    except (InvalidInput, ValidationError):  # a negative index fails Target's own bound
        return None


def pick_device(requested: str | None = None) -> torch.device:
    """`cuda` when present (or asked for), else `cpu`."""
    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInput("--device cuda was asked for, but no CUDA device is available")
    return torch.device(requested)
