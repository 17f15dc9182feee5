"""Model specs are told apart on the light side, schemes before module:callable."""

import pytest

from explainctl.cli.options import build_model_spec
from explainctl.spec.errors import InvalidInput
from explainctl.spec.models import ModelSource, model_matches, parse_model


@pytest.mark.parametrize(
    ("spec", "source"),
    [
        ("timm:resnet50", ModelSource("timm", "resnet50")),
        ("timm:convnext_tiny.fb_in1k", ModelSource("timm", "convnext_tiny.fb_in1k")),
        ("hf-hub:timm/vit_small.augreg", ModelSource("timm", "hf-hub:timm/vit_small.augreg")),
        ("hf-hub:timm/resnet18@main", ModelSource("timm", "hf-hub:timm/resnet18", "main")),
        ("hf:google/vit-base-patch16-224", ModelSource("hf", "google/vit-base-patch16-224")),
        ("hf:microsoft/resnet-50@a1b2c3d", ModelSource("hf", "microsoft/resnet-50", "a1b2c3d")),
        ("tests.support.models:tiny", ModelSource("callable", "tests.support.models:tiny")),
        ("vgg19", ModelSource("local", "vgg19")),
        ("/models/vit", ModelSource("local", "/models/vit")),
        ("./runs/12:00/model.pt", ModelSource("local", "./runs/12:00/model.pt")),
    ],
)  # fmt: skip
def test_each_form_names_its_source(spec, source):
    assert parse_model(spec) == source


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("timm:", "timm:NAME"),
        ("timm:resnet50@v1", "timm:NAME"),
        ("hf:", "Hub repository id"),
        ("hf:org/name/extra", "Hub repository id"),
        ("hf:org/../name", "Hub repository id"),
        ("hf:org/name@", "not a revision"),
        ("hf-hub:org/na me", "Hub repository id"),
        ("my module:net", "module:callable"),
        ("my.module:", "module:callable"),
    ],
)
def test_a_malformed_spec_is_refused_in_one_line_before_anything_runs(spec, fragment):
    with pytest.raises(InvalidInput, match=fragment) as caught:
        build_model_spec(spec, None, None, None)
    assert "\n" not in str(caught.value)


def test_mean_and_std_not_given_are_the_models_own():
    spec = build_model_spec("timm:resnet50", None, None, "0.5,0.5,0.5")
    assert spec.mean is None and spec.std == (0.5, 0.5, 0.5)


def test_allow_list_patterns():
    allowed = ("timm:*", "hf:myorg/*", "vgg19")
    assert model_matches("timm:convnext_tiny.fb_in22k_ft_in1k", allowed)
    assert model_matches("hf:myorg/net", allowed) and model_matches("hf:myorg/net@v2", allowed)
    assert not model_matches("hf:myorgevil/net", allowed)
    assert not model_matches("hf:other/net", allowed)
    assert not model_matches("hf-hub:timm/resnet18.a1_in1k", allowed)
    assert model_matches("vgg19", allowed) and not model_matches("vgg16", allowed)
    assert model_matches("/anything", ("*",))
