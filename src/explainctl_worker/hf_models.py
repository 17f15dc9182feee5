"""transformers image classifiers (`hf:ORG/NAME[@REV]`, directories they saved): safetensors
weights only, no code from the repository, logits out of the model's output object, and the
preprocessing and class names of their own configuration."""

from __future__ import annotations

import re

import torch
from torch import nn

from explainctl.spec.contracts import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, ResolvedModel
from explainctl.spec.errors import ModelUnavailable
from explainctl_worker.weights import read_state_dict, unavailable

# PIL's resampling filters by number, as image processors record them.
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# The names transformers gives classes nobody named.
_DEFAULT_LABEL = re.compile(r"LABEL_\d+")


class Logits(nn.Module):
    """A transformers classifier as a plain `x -> logits` module."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ModelUnavailable("hf: models need transformers: install explainctl[hf]") from None
    # Its loading bars and notices would interleave with the CLI's own progress and a
    # worker's log; a failure still reaches the user, as one ModelUnavailable line.
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load(repo: str, spec: ModelSpec, revision: str | None = None, *, source: str = "hf"):
    """(module, resolved, class names) of the classifier at `repo` (a Hub id or a local
    directory). With spec.weights the architecture is built from its config alone and
    the file's state dict loaded into it: no weights download."""
    transformers = _transformers()
    at = {"revision": revision} if revision else {}
    what = f"{repo}@{revision}" if revision else repo
    try:
        if spec.weights:
            config = transformers.AutoConfig.from_pretrained(repo, trust_remote_code=False, **at)
            architecture = type(transformers.AutoModelForImageClassification.from_config(config))
        else:
            model = transformers.AutoModelForImageClassification.from_pretrained(
                repo, use_safetensors=True, trust_remote_code=False, **at
            )
    except Exception as error:  # unknown, offline, not an image classifier: one line each
        raise unavailable(f"Hugging Face model {what}", error) from None
    if spec.weights:
        model = _with_weights(architecture, config, spec.weights)
    commit = getattr(model.config, "_commit_hash", None) or revision
    resolved = _resolved(transformers, repo, model.config, at, source, commit)
    return Logits(model), resolved, _labels(model.config)


def _with_weights(architecture, config, path: str) -> nn.Module:
    """The architecture with the state dict at `path`, named as saved files name their
    tensors or as the module does (transformers renames between the two on loading)."""
    state = read_state_dict(path)
    try:
        model, info = architecture.from_pretrained(
            None, config=config, state_dict=state, output_loading_info=True
        )
    except Exception as error:  # a state dict of another shape: one line
        raise unavailable(f"weights file {path}", error) from None
    if missing := info.get("missing_keys"):
        raise ModelUnavailable(
            f"weights file {path} does not fit the model: {len(missing)} tensors missing, "
            f"e.g. {sorted(missing)[0]}"
        )
    return model


def _resolved(transformers, repo, config, at, source, commit) -> ResolvedModel:
    """The image processor's size, mean, std and resampling; without one, the config's
    image size and ImageNet's statistics."""
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(repo, **at)
    except (OSError, ValueError, KeyError):
        processor = None
    size = getattr(config, "image_size", None) or 224
    size = size if isinstance(size, int) else max(size)
    if processor is None:
        return ResolvedModel(source=source, revision=commit, image_size=size)
    # What the model sees is the centre crop where the processor crops, else the resize.
    shape = (
        getattr(processor, "crop_size", None)
        if getattr(processor, "do_center_crop", False)
        else None
    )
    shape = shape or getattr(processor, "size", None) or {}
    side = shape.get("height") or shape.get("shortest_edge") or size
    mean = getattr(processor, "image_mean", None) or IMAGENET_MEAN
    std = getattr(processor, "image_std", None) or IMAGENET_STD
    resample = getattr(processor, "resample", 2)
    return ResolvedModel(
        source=source,
        revision=commit,
        image_size=int(side),
        mean=_triple(mean),
        std=_triple(std),
        interpolation=_RESAMPLE.get(int(resample), "bilinear"),
    )


def _triple(values) -> tuple[float, float, float]:
    values = [float(v) for v in (values if isinstance(values, list | tuple) else [values])]
    return tuple(values * 3)[:3] if len(values) == 1 else tuple(values[:3])


def _labels(config) -> list[str] | None:
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label.get(i, id2label.get(str(i), ""))) for i in range(config.num_labels)]
    if not any(names) or all(_DEFAULT_LABEL.fullmatch(n) for n in names):
        return None
    return names
