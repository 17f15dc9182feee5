"""State dicts from local files (--weights): a torch archive read without running its code,
or a safetensors file."""

from __future__ import annotations

import os

import torch
from torch import nn

from explainctl.spec.errors import ModelUnavailable


def read_state_dict(path: str) -> dict:
    if not os.path.isfile(path):
        raise ModelUnavailable(f"weights file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise ModelUnavailable(
            f"{path} is a safetensors file: install explainctl[hf] to read it"
        ) from None
    except Exception as error:  # any unreadable file is the same failure for a user
        raise ModelUnavailable(f"cannot read weights file {path}: {type(error).__name__}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def load_weights(module: nn.Module, path: str) -> nn.Module:
    """`module` with the state dict at `path`; a mismatch is a ModelUnavailable line."""
    try:
        module.load_state_dict(read_state_dict(path))
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        reason = first[1].strip() if len(first) > 1 else first[0] if first else ""
        raise ModelUnavailable(
            f"weights file {path} does not fit the model: {reason[:160]}"
        ) from None
    return module


def unavailable(what: str, error: Exception) -> ModelUnavailable:
    """A model that cannot be fetched or built, in one line: offline, unknown, refused."""
    lines = str(error).strip().splitlines()
    reason = lines[0].split(". ")[0][:200] if lines else ""
    return ModelUnavailable(
        f"cannot load {what} ({type(error).__name__}: {reason}); offline, the Hugging Face "
        "cache (HF_HOME) must hold it, or pass --weights FILE"
    )
