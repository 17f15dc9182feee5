"""The forms `--model` takes, told apart without torch, so `submit` refuses a malformed one
before anything is queued; the worker loads what `parse_model` names
(explainctl_worker.model).

    timm:NAME[.TAG]          a timm model, its pretrained weights by tag (timm's registry)
    hf-hub:ORG/NAME[@REV]    a timm model on the Hugging Face Hub (timm's own scheme)
    hf:ORG/NAME[@REV]        a transformers image classifier on the Hub (safetensors only)
    module:callable          a function returning an nn.Module
    anything else            a local file or directory (TorchScript, torch.export,
                             save_pretrained), or a torchvision model name

Schemes are read before `module:callable`: `timm:resnet50` is never an import.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

SourceKind = Literal["timm", "hf", "callable", "local"]

# Hub repository ids: ORG/NAME (or a bare NAME, as a few old repositories are), each part
# the characters the Hub allows; a revision is a branch, tag or commit.
_PART = r"[A-Za-z0-9][\w.-]{0,95}"
_REPO = re.compile(rf"(?:{_PART}/)?{_PART}")
_REVISION = re.compile(r"[\w.][\w./-]{0,199}")
_TIMM_NAME = re.compile(r"[A-Za-z0-9][\w-]*(?:\.[\w-]+)?")
_CALLABLE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
SCHEMES = ("timm:", "hf-hub:", "hf:")


@dataclass(frozen=True)
class ModelSource:
    """Where a spec's model comes from: `name` is what that source calls it (for
    `hf-hub:` specs, timm's own `hf-hub:ORG/NAME`), `revision` the one asked for."""

    kind: SourceKind
    name: str
    revision: str | None = None


def _repo(text: str, spec: str) -> tuple[str, str | None]:
    repo, at, revision = text.partition("@")
    if not _REPO.fullmatch(repo) or ".." in repo:
        raise ValueError(f"model {spec!r}: {repo!r} is not a Hub repository id (ORG/NAME)")
    if at and not (_REVISION.fullmatch(revision) and ".." not in revision):
        raise ValueError(f"model {spec!r}: {revision!r} is not a revision")
    return repo, revision or None


def parse_model(spec: str) -> ModelSource:
    """The source `spec` names; ValueError, in one line, when a scheme's name is malformed."""
    spec = spec.strip()
    if spec.startswith("timm:"):
        name = spec.removeprefix("timm:")
        if not _TIMM_NAME.fullmatch(name):
            raise ValueError(f"model {spec!r}: expected timm:NAME or timm:NAME.TAG")
        return ModelSource("timm", name)
    if spec.startswith("hf-hub:"):
        repo, revision = _repo(spec.removeprefix("hf-hub:"), spec)
        return ModelSource("timm", f"hf-hub:{repo}", revision)
    if spec.startswith("hf:"):
        repo, revision = _repo(spec.removeprefix("hf:"), spec)
        return ModelSource("hf", repo, revision)
    if ":" in spec and not _looks_like_path(spec):
        if not _CALLABLE.fullmatch(spec):
            raise ValueError(
                f"model {spec!r}: expected timm:NAME, hf-hub:ORG/NAME, hf:ORG/NAME[@REV] "
                "or module:callable"
            )
        return ModelSource("callable", spec)
    return ModelSource("local", spec)


def _looks_like_path(spec: str) -> bool:
    # A path with a colon in it (`./runs/12:00/model.pt`) is still a path.
    return spec.startswith(("/", "./", "../", "~"))


def model_matches(spec: str, patterns: Iterable[str]) -> bool:
    """Whether model `spec` matches one of `patterns` (fnmatch: `timm:*`, `hf:myorg/*`,
    `*` for any). An `hf:` spec's revision is part of what is matched, so `hf:org/*`
    allows every revision of org's models and `hf:org/net@v1` that one alone."""
    spec = spec.strip()
    return any(fnmatch.fnmatchcase(spec, pattern.strip()) for pattern in patterns)
