"""timm specs load offline with their own preprocessing and ImageNet's class names."""

import pytest
import torch

from explainctl.spec.contracts import IMAGENET_MEAN, ModelSpec
from explainctl.spec.errors import ModelUnavailable
from explainctl.spec.methods import ExplainParams
from explainctl_worker.model import ModelCache
from tests.support import hub


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("timm")
    image = hub.photo(folder / "photo.png")
    return hub.timm_state_dict(folder, image), hub.timm_directory(folder)


def _own(loaded) -> dict:
    resolved = loaded.resolved
    return {key: getattr(resolved, key) for key in hub.TIMM_PREP}


def test_a_registry_name_with_local_weights_resolves_its_own_preprocessing(saved):
    weights, _ = saved
    loaded = ModelCache().get(ModelSpec(name=f"timm:{hub.TIMM_NAME}", weights=str(weights)), "cpu")
    assert _own(loaded) == hub.TIMM_PREP
    assert loaded.resolved.source == "timm" and loaded.resolved.labels == "model"
    # An ImageNet-1k classifier: timm's ImageNet names, by their first lemma.
    assert len(loaded.categories) == 1000
    assert loaded.categories[hub.TIMM_CLASS] == "tabby"
    # The weights are the file's, not a fresh random draw.
    state = torch.load(weights, weights_only=True)
    assert torch.equal(loaded.module.head.fc.weight, state["head.fc.weight"])


def test_flags_override_the_models_own_preprocessing(saved):
    weights, _ = saved
    spec = ModelSpec(name=f"timm:{hub.TIMM_NAME}", weights=str(weights), mean=IMAGENET_MEAN)
    loaded = ModelCache().get(spec, "cpu")
    assert loaded.resolved.mean == IMAGENET_MEAN and loaded.resolved.std == (0.5, 0.5, 0.5)
    params, resolved = loaded.prepare(ExplainParams(mask_size=16))
    assert params.image_size == resolved.image_size == 160
    params, resolved = loaded.prepare(ExplainParams(image_size=96, mask_size=16))
    assert params.image_size == resolved.image_size == 96


def test_weights_with_another_class_count_build_a_head_that_fits(saved, tmp_path):
    import timm

    fine_tuned = timm.create_model(hub.TIMM_NAME, pretrained=False, num_classes=5)
    torch.save(fine_tuned.state_dict(), tmp_path / "five.pt")
    spec = ModelSpec(name=f"timm:{hub.TIMM_NAME}", weights=str(tmp_path / "five.pt"))
    loaded = ModelCache().get(spec, "cpu")
    assert loaded.module(torch.zeros(1, 3, 160, 160)).shape == (1, 5)
    assert loaded.categories is None  # not ImageNet's: --labels names them


def test_a_directory_timm_saved_loads_with_its_configuration(saved):
    _, directory = saved
    loaded = ModelCache().get(ModelSpec(name=str(directory)), "cpu")
    assert _own(loaded) == hub.TIMM_PREP and loaded.resolved.source == "timm"
    assert loaded.categories[hub.TIMM_CLASS] == "tabby"


def test_an_unknown_timm_name_is_one_line():
    with pytest.raises(ModelUnavailable, match="timm model no_such_net") as caught:
        ModelCache().get(ModelSpec(name="timm:no_such_net"), "cpu")
    assert "\n" not in str(caught.value)
