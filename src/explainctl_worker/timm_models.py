"""timm models (`timm:NAME[.TAG]`, `hf-hub:ORG/NAME`, directories timm saved), with the
preprocessing and class names of their own configuration."""

from __future__ import annotations

import re

from torch import nn

from explainctl.spec.contracts import ModelSpec, ResolvedModel
from explainctl.spec.errors import ModelUnavailable
from explainctl_worker.weights import load_weights, unavailable

_SYNSET = re.compile(r"n\d{8}")


def _timm():
    try:
        import timm
    except ImportError:
        raise ModelUnavailable("timm models need timm: install explainctl[timm]") from None
    return timm


def load(name: str, spec: ModelSpec, revision: str | None = None, *, source: str = "timm"):
    """(module, resolved, class names) of timm model `name`: a registry name with its tag,
    `hf-hub:ORG/NAME` or `local-dir:PATH`. With spec.weights the architecture is built from
    its configuration alone and the file's state dict loaded into it: no weights download."""
    timm = _timm()
    full = f"{name}@{revision}" if revision else name
    try:
        module = timm.create_model(full, pretrained=not spec.weights)
    except Exception as error:  # unknown, offline, refused by the Hub: one line each
        raise unavailable(f"timm model {full}", error) from None
    if spec.weights:
        module = _fitting(timm, full, module, spec.weights)
    return module, _resolved(timm, module, source, revision), _labels(timm, module)


def _fitting(timm, name: str, module: nn.Module, path: str) -> nn.Module:
    """The architecture with the class count of the state dict at `path`, which may be a
    fine-tune of the registry's model with its own number of classes."""
    from explainctl_worker.weights import read_state_dict

    state = read_state_dict(path)
    head = module.pretrained_cfg.get("classifier")
    head = head[0] if isinstance(head, list | tuple) else head
    weight = state.get(f"{head}.weight") if head else None
    if weight is not None and weight.shape[0] != module.num_classes:
        module = timm.create_model(name, pretrained=False, num_classes=int(weight.shape[0]))
    return load_weights(module, path)


def _resolved(timm, module: nn.Module, source: str, revision: str | None) -> ResolvedModel:
    config = timm.data.resolve_model_data_config(module)
    interpolation = config.get("interpolation", "bilinear")
    return ResolvedModel(
        source=source,
        revision=revision,
        image_size=int(config["input_size"][-1]),
        mean=tuple(float(v) for v in config["mean"]),
        std=tuple(float(v) for v in config["std"]),
        # "random" is a training augmentation: evaluate as timm's own eval transform would.
        interpolation=interpolation if interpolation != "random" else "bilinear",
    )


def _labels(timm, module: nn.Module) -> list[str] | None:
    """Names the model's configuration gives (a saved model's label_names and their
    descriptions), else ImageNet's where the class count says it is an ImageNet classifier."""
    config = getattr(module, "pretrained_cfg", None) or {}
    names = config.get("label_names")
    descriptions = config.get("label_descriptions") or {}
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names, key=int)] if names else None
    if names and len(names) == module.num_classes:
        if descriptions:
            return [_short(descriptions.get(n, n)) for n in names]
        if not all(_SYNSET.fullmatch(str(n)) for n in names):
            return [str(n) for n in names]
    subset = timm.data.infer_imagenet_subset(module)
    if subset is None:
        return None
    info = timm.data.ImageNetInfo(subset)
    return [_short(info.index_to_description(i)) for i in range(info.num_classes())]


def _short(description: str) -> str:
    # "tabby, tabby cat": the first name, as torchvision's categories give it.
    return description.split(",")[0].strip()
