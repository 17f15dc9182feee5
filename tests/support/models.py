"""Small models for tests, importable as `tests.support.models:NAME` model specs (no
downloaded weights)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

SIZE = 64
# Boxes (top, bottom, left, right) of the textured patches in `evidence_image`.
EVIDENCE_BOX = (16, 48, 8, 24)
DISTRACTOR_BOX = (16, 48, 40, 56)


class EvidenceDetector(nn.Module):
    """Class 0 = "checkerboard texture inside EVIDENCE_BOX"; class 1 = anything else.

    It measures the 2-pixel checkerboard response averaged over EVIDENCE_BOX only, so an
    identical patch in DISTRACTOR_BOX has no effect on its output. Inputs are normalised
    with mean = std = 0.5, so pixels 0/1 become -1/+1 and the texture's response is ~4.
    """

    def __init__(self):
        super().__init__()
        kernel = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).view(1, 1, 2, 2)
        self.register_buffer("kernel", kernel)
        weight = torch.zeros(1, 1, SIZE - 1, SIZE - 1)
        top, bottom, left, right = EVIDENCE_BOX
        weight[..., top : bottom - 1, left : right - 1] = 1.0
        self.register_buffer("weight", weight / weight.sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grey = x.mean(dim=1, keepdim=True)
        response = nn.functional.conv2d(grey, self.kernel).abs()
        evidence = (response * self.weight).flatten(1).sum(dim=1)
        logit = 3.0 * (evidence - 2.0)
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


def evidence_detector() -> nn.Module:
    return EvidenceDetector()


def evidence_image() -> np.ndarray:
    """(SIZE, SIZE, 3) uint8: grey with the same checkerboard in both boxes."""
    image = np.full((SIZE, SIZE, 3), 128, dtype=np.uint8)
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    checker = (((ys + xs) % 2) * 255).astype(np.uint8)
    for top, bottom, left, right in (EVIDENCE_BOX, DISTRACTOR_BOX):
        image[top:bottom, left:right, :] = checker[top:bottom, left:right, None]
    return image


def evidence_batch() -> torch.Tensor:
    """evidence_image as the engine takes it: (1, 3, SIZE, SIZE) float in [0, 1]."""
    return torch.from_numpy(evidence_image()).permute(2, 0, 1).float().div(255)[None]


# The evidence detector's normalisation: pixels in [0, 1] to [-1, 1].
HALF = (0.5, 0.5, 0.5)


class ColourClassifier(nn.Module):
    """Three classes, red, green and blue (in that order): the channel with the highest
    mean wins, so a test knows each image's top-1 from its colour. With mean = std = 0.5
    a grey background is 0 in every channel and only the coloured part counts."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor(16.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x.mean(dim=(2, 3))


def colour_classifier() -> nn.Module:
    return ColourClassifier()


class TinyClassifier(nn.Module):
    """A seeded random 10-class CNN: cheap, deterministic, with a real conv/BN/pool stack."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Linear(16 * 16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def tiny_classifier() -> nn.Module:
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(1234)
    try:
        return TinyClassifier()
    finally:
        torch.random.set_rng_state(generator_state)


class PoisonedClassifier(TinyClassifier):
    """TinyClassifier that kills its own process on a magenta image, as the OOM killer
    would: the poison item of the fault tests."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ImageNet-normalised magenta: red and blue high, green low, everywhere.
        magenta = (x[:, 0] > 1.5) & (x[:, 1] < -1.5) & (x[:, 2] > 1.5)
        if bool((magenta.flatten(1).float().mean(dim=1) > 0.9).any()):
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(x)


def poisoned_classifier() -> nn.Module:
    model = PoisonedClassifier()
    model.load_state_dict(tiny_classifier().state_dict())
    return model


class BrokenDeviceClassifier(TinyClassifier):
    """Fails every optimisation pass as a GPU does after a sticky CUDA error."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
        return super().forward(x)


def broken_device_classifier() -> nn.Module:
    model = BrokenDeviceClassifier()
    model.load_state_dict(tiny_classifier().state_dict())
    return model
