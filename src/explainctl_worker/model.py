"""Loading the classifier named by a ModelSpec, once per process.

A spec is a torchvision classification model name (`vgg19`), a TorchScript file, or
`module:callable` returning an `nn.Module`. Loaded models are frozen (no weight gradients)
and in eval mode.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from explainctl.spec.contracts import ModelSpec, Target
from explainctl.spec.errors import InvalidInput, ModelUnavailable


@dataclass
class LoadedModel:
    module: nn.Module
    spec: ModelSpec
    device: torch.device
    categories: list[str] | None  # class names by index, when the model has them

    def with_labels(self, labels: Sequence[str] | None) -> LoadedModel:
        """The same module with a job's own class names (--labels) in place of its own."""
        if not labels:
            return self
        named = dataclasses.replace(self, categories=list(labels))
        # The output-width probe (explain.num_classes) is the module's: share it.
        named.__dict__["_num_classes"] = self.__dict__.setdefault("_num_classes", {})
        return named


def _freeze(module: nn.Module, device: torch.device) -> nn.Module:
    module = module.to(device).eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def _torchvision_model(spec: ModelSpec) -> tuple[nn.Module, list[str] | None]:
    from torchvision import models

    weights_enum = models.get_model_weights(spec.name)
    default = weights_enum.DEFAULT
    categories = list(default.meta.get("categories") or []) or None
    if spec.weights:
        module = models.get_model(spec.name, weights=None)
        module.load_state_dict(_read_state_dict(spec.weights))
        return module, categories
    try:
        module = models.get_model(spec.name, weights=default)
    except (OSError, RuntimeError) as error:
        raise _download_failed(spec, error) from None
    return module, categories


def _download_failed(spec: ModelSpec, error: Exception) -> ModelUnavailable:
    # OSError covers URLError and socket errors: no network, or a proxy that refuses.
    reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
    return ModelUnavailable(
        f"cannot download the weights of {spec.name} ({reason}); pass --weights PATH "
        "to a local state dict, or choose another --model"
    )


def _read_state_dict(path: str) -> dict:
    if not os.path.isfile(path):
        raise ModelUnavailable(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file is the same failure for a user
        raise ModelUnavailable(f"cannot read weights file {path}: {type(error).__name__}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


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
        module.load_state_dict(_read_state_dict(spec.weights))
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

    if spec.weights or os.path.isfile(spec.name) or ":" in spec.name:
        return
    if spec.name not in models.list_models(module=models):
        raise ModelUnavailable(f"unknown model {spec.name!r}")
    try:
        models.get_model_weights(spec.name).DEFAULT.get_state_dict(progress=False)
    except (OSError, RuntimeError) as error:
        raise _download_failed(spec, error) from None


def _load(spec: ModelSpec, device: torch.device) -> LoadedModel:
    from torchvision import models

    categories = None
    if os.path.isfile(spec.name):
        module = _file_model(spec.name)
    elif ":" in spec.name:
        module = _callable_model(spec)
    elif spec.name in models.list_models(module=models):
        module, categories = _torchvision_model(spec)
    else:
        raise ModelUnavailable(
            f"unknown model {spec.name!r}: use a torchvision classification model name, "
            "a TorchScript file, or module:callable"
        )
    return LoadedModel(_freeze(module, device), spec, device, categories)


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


def pick_device(requested: str | None = None) -> torch.device:
    """`cuda` when present (or asked for), else `cpu`."""
    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInput("--device cuda was asked for, but no CUDA device is available")
    return torch.device(requested)
