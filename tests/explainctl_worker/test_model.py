import urllib.request

import pytest
import torch

from explainctl.spec.contracts import ModelSpec, Target
from explainctl.spec.errors import InvalidInput, ModelUnavailable
from explainctl_worker.model import ModelCache, pick_device, resolve_target
from tests.support.models import TinyClassifier, tiny_classifier


def test_callable_spec_loads_frozen_eval_model():
    loaded = ModelCache().get(ModelSpec(name="tests.support.models:tiny_classifier"), "cpu")
    assert isinstance(loaded.module, TinyClassifier)
    assert not loaded.module.training
    assert all(not p.requires_grad for p in loaded.module.parameters())
    assert loaded.categories is None


def test_cache_returns_the_same_model_and_evicts_the_oldest():
    cache = ModelCache(capacity=1)
    first = cache.get(ModelSpec(name="tests.support.models:tiny_classifier"), "cpu")
    assert cache.get(ModelSpec(name="tests.support.models:tiny_classifier"), "cpu") is first
    cache.get(ModelSpec(name="tests.support.models:evidence_detector"), "cpu")
    assert cache.get(ModelSpec(name="tests.support.models:tiny_classifier"), "cpu") is not first


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_file(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.jit.script(tiny_classifier().eval()).save(str(path))
    loaded = ModelCache().get(ModelSpec(name=str(path)), "cpu")
    x = torch.rand(1, 3, 32, 32)
    assert torch.allclose(loaded.module(x), tiny_classifier().eval()(x), atol=1e-6)


def test_torch_export_file(tmp_path):
    path = tmp_path / "tiny.pt2"
    example = torch.rand(1, 3, 32, 32)
    torch.export.save(torch.export.export(tiny_classifier().eval(), (example,)), str(path))
    loaded = ModelCache().get(ModelSpec(name=str(path)), "cpu")
    assert torch.allclose(loaded.module(example), tiny_classifier().eval()(example), atol=1e-6)


def test_torchvision_name_with_local_weights_and_class_names(tmp_path):
    from torchvision import models

    path = tmp_path / "resnet18.pth"
    torch.manual_seed(0)
    reference = models.get_model("resnet18", weights=None)
    torch.save(reference.state_dict(), path)
    loaded = ModelCache().get(ModelSpec(name="resnet18", weights=str(path)), "cpu")
    assert torch.equal(loaded.module.fc.weight, reference.fc.weight)
    assert len(loaded.categories) == 1000
    assert resolve_target(Target.parse("tabby"), loaded.categories) == 281


def test_offline_download_fails_with_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # nothing listens: fails at once
    # urlopen keeps the opener it first builds, dead proxy included: this one is put back,
    # or every later urlopen of this test process would go through that proxy.
    monkeypatch.setattr(urllib.request, "_opener", None)
    with pytest.raises(ModelUnavailable) as caught:
        ModelCache().get(ModelSpec(name="squeezenet1_1"), "cpu")
    message = str(caught.value)
    assert "--weights" in message and "\n" not in message


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        (ModelSpec(name="no_such_net"), "unknown model"),
        (ModelSpec(name="resnet18", weights="/nonexistent/w.pth"), "not found"),
        (ModelSpec(name="tests.support.models:missing"), "cannot import"),
        (ModelSpec(name="no.such.module:factory"), "cannot import"),
    ],
)
def test_unloadable_models(spec, fragment):
    with pytest.raises(ModelUnavailable, match=fragment):
        ModelCache().get(spec, "cpu")


def test_not_torchscript_file(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a model")
    with pytest.raises(ModelUnavailable, match="not a TorchScript"):
        ModelCache().get(ModelSpec(name=str(path)), "cpu")


def test_resolve_target():
    names = ["cat", "Dog"]
    assert resolve_target(Target(), names) is None
    assert resolve_target(Target.parse("1"), names) == 1
    assert resolve_target(Target.parse("dog"), names) == 1
    with pytest.raises(InvalidInput, match="out of range"):
        resolve_target(Target(index=5), names, num_classes=2)
    with pytest.raises(InvalidInput, match="unknown class"):
        resolve_target(Target(name="bird"), names)
    with pytest.raises(InvalidInput, match="no class names"):
        resolve_target(Target(name="cat"), None)


def test_pick_device():
    assert pick_device("cpu").type == "cpu"
    assert pick_device(None).type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInput):
            pick_device("cuda")
