"""transformers classifiers load offline: logits out of their output object, their own
preprocessing and class names."""

import pytest
import torch

from explainctl.spec.contracts import IMAGENET_STD, ModelSpec
from explainctl.spec.errors import ModelUnavailable
from explainctl_worker.model import ModelCache
from tests.support import hub


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    image = hub.photo(folder / "photo.png")
    hub.hf_directory(folder, image)
    hub.hf_directory(folder, image, labels=None)
    return folder


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_a_saved_directory_resolves_its_processor_and_names(folder):
    loaded = ModelCache().get(ModelSpec(name=str(folder / "vit")), "cpu")
    resolved = loaded.resolved
    assert {key: getattr(resolved, key) for key in hub.HF_PREP} == hub.HF_PREP
    assert resolved.source == "hf" and resolved.labels == "model"
    assert loaded.categories == ["apple", "boat", "cat"]
    logits = loaded.module(torch.zeros(2, 3, 32, 32))
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 3)


def test_transformers_default_label_names_are_no_names(folder):
    loaded = ModelCache().get(ModelSpec(name=str(folder / "vit-unnamed")), "cpu")
    assert loaded.categories is None and loaded.resolved.labels is None


def test_std_flag_overrides_and_weights_file_loads_into_the_config(folder, tmp_path):
    from safetensors.torch import save_file

    state = {k: torch.full_like(v, 0.01) for k, v in _state(folder / "vit").items()}
    save_file(state, tmp_path / "weights.safetensors")
    spec = ModelSpec(
        name=str(folder / "vit"), weights=str(tmp_path / "weights.safetensors"), std=IMAGENET_STD
    )
    loaded = ModelCache().get(spec, "cpu")
    assert loaded.resolved.std == IMAGENET_STD and loaded.resolved.mean == hub.HF_PREP["mean"]
    assert torch.all(loaded.module.model.classifier.weight == 0.01)


def _state(path):
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def test_a_hub_model_missing_offline_is_one_line(offline):
    with pytest.raises(ModelUnavailable, match="Hugging Face model myorg/absent@v1") as caught:
        ModelCache().get(ModelSpec(name="hf:myorg/absent@v1"), "cpu")
    assert "\n" not in str(caught.value)
