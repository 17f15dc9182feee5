"""Tiny timm and transformers classifiers, built offline with random weights and saved as
users keep them (a state dict, save_pretrained directories), steered so that they name a
known class only when an image is prepared with their own preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

# timm's registry model and what its configuration says about its inputs.
TIMM_NAME = "test_convnext.r160_in1k"
TIMM_PREP = {"image_size": 160, "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic"}
TIMM_CLASS, TIMM_OTHER = 281, 1  # ImageNet's "tabby" and "goldfish"

# The transformers model's own preprocessing (its saved preprocessor_config.json).
HF_LABELS = {0: "apple", 1: "boat", 2: "cat"}
HF_PREP = {
    "image_size": 32,
    "mean": (0.2, 0.3, 0.4),
    "std": (0.1, 0.2, 0.3),
    "interpolation": "bicubic",
}
HF_CLASS, HF_OTHER = 2, 0


def photo(path: Path) -> Path:
    """A 48 px picture with colour in it, saved as PNG."""
    ys, xs = np.mgrid[0:48, 0:48]
    rgb = np.stack([xs * 5, ys * 5, (xs + ys) * 2 % 256], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def _prepared(image: Path, prep: dict, mean, std) -> torch.Tensor:
    side = prep["image_size"]
    resample = Image.Resampling[prep["interpolation"].upper()]
    resized = Image.open(image).convert("RGB").resize((side, side), resample)
    x = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def steer(model: nn.Module, head: nn.Linear, forward, image: Path, prep: dict, good, other):
    """Set `head` (the final Linear) so that `good` wins by a wide margin on `image` prepared
    with `prep`'s own mean and std, and `other` wins on it prepared with ImageNet's."""
    seen = []
    hook = head.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0][0].detach()))
    with torch.no_grad():
        forward(_prepared(image, prep, prep["mean"], prep["std"]))
        forward(_prepared(image, prep, *IMAGENET))
    hook.remove()
    own, imagenet = seen
    direction = own - imagenet
    scale = 20 / direction.dot(direction)
    middle = direction.dot(own + imagenet) / 2
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.weight[good], head.bias[good] = scale * direction, -scale * middle
        head.weight[other], head.bias[other] = -scale * direction, scale * middle
    return model


def timm_state_dict(directory: Path, image: Path) -> Path:
    """The weights of timm:TIMM_NAME, steered on `image`, as a state dict file."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(TIMM_NAME, pretrained=False).eval()
    steer(model, model.get_classifier(), model, image, TIMM_PREP, TIMM_CLASS, TIMM_OTHER)
    path = directory / "test_convnext.pt"
    torch.save(model.state_dict(), path)
    return path


def timm_directory(directory: Path) -> Path:
    """timm:TIMM_NAME saved with timm's own save_for_hf (config.json + safetensors)."""
    import timm

    torch.manual_seed(1)
    model = timm.create_model(TIMM_NAME, pretrained=False)
    timm.models.save_for_hf(model, directory / "timm-net", safe_serialization=True)
    return directory / "timm-net"


def hf_directory(directory: Path, image: Path, labels: dict | None = HF_LABELS) -> Path:
    """A tiny ViT classifier and its image processor, saved with save_pretrained, steered
    on `image`; `labels=None` leaves transformers' LABEL_0.. names."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    named = {"id2label": labels, "label2id": {v: k for k, v in labels.items()}} if labels else {}
    config = ViTConfig(
        image_size=32, patch_size=8, num_hidden_layers=1, hidden_size=16,
        num_attention_heads=2, intermediate_size=32, num_labels=3, **named,
    )  # fmt: skip
    torch.manual_seed(0)
    model = ViTForImageClassification(config).eval()
    steer(
        model,
        model.classifier,
        lambda x: model(pixel_values=x),
        image,
        HF_PREP,
        HF_CLASS,
        HF_OTHER,
    )
    path = directory / ("vit" if labels else "vit-unnamed")
    model.save_pretrained(path)
    ViTImageProcessor(
        size={"height": 32, "width": 32},
        image_mean=list(HF_PREP["mean"]),
        image_std=list(HF_PREP["std"]),
        resample=Image.Resampling.BICUBIC,
    ).save_pretrained(path)
    return path
