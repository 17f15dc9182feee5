"""chunk._store_artifacts and _record: what a finished item puts into its job record."""

import io
import json

import torch
from PIL import Image

from explainctl.config import Settings
from explainctl.spec.contracts import ChunkPayload, ModelSpec, Target
from explainctl.spec.ids import new_job_id
from explainctl.spec.methods import ExplainParams
from explainctl.spec.results import ItemRecord
from explainctl_worker.explain import ItemInput, explain_items
from explainctl_worker.model import LoadedModel
from explainctl_worker.service.chunk import WorkerContext, _record, _store_artifacts
from tests.support.models import HALF, evidence_detector, evidence_image


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(evidence_image()).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_record_gets_the_method_and_metrics(tmp_path):
    spec = ModelSpec(name="tests.support.models:evidence_detector", mean=HALF, std=HALF)
    loaded = LoadedModel(evidence_detector().eval(), spec, torch.device("cpu"), None)
    params = ExplainParams(
        method="paper", iterations=5, mask_size=8, image_size=64, metrics=True, metric_steps=8
    )
    item = ItemInput("000000-evidence", "mem://evidence.png", _png, Target())
    payload = ChunkPayload(
        job_id=new_job_id(), chunk=0, model=spec, params=params, output=str(tmp_path), items=[]
    )
    # Storing needs only the context's storage (and the S3 deadlines of its settings).
    context = WorkerContext(settings=Settings(), store=None)
    (outcome,) = explain_items(
        [item], loaded, params, deliver=lambda o: _store_artifacts(context, payload, o, 2)
    )
    assert outcome.ok, outcome.error
    record = ItemRecord(index=0, uri=item.source, item=item.name, state="done", **_record(outcome))
    assert record.method == "paper"
    assert record.iterations == 5 and record.stop_reason == "budget"
    for name in ("deletion_auc", "deletion_auc_blur", "insertion_auc", "prob_keep"):
        assert getattr(record, name) == getattr(outcome.result, name) is not None
    assert set(record.artifacts) == set(outcome.files)
    # Written under its attempt, and result.json says which attempt wrote it.
    assert record.attempt == 2
    stored = tmp_path / payload.job_id / item.name / "attempt-2"
    assert record.artifacts["mask.npy"] == str(stored / "mask.npy")
    assert json.loads((stored / "result.json").read_text())["attempt"] == 2


def test_allowed_models_when_set_is_the_complete_list():

    def allowed(setting: tuple[str, ...], name: str, weights: str | None = None) -> bool:
        context = WorkerContext(settings=Settings(allowed_models=setting), store=None)
        return context.model_allowed(ModelSpec(name=name, weights=weights))

    # Unset: torchvision's own models with their own weights, nothing else.
    assert allowed((), "resnet18") and not allowed((), "resnet18", weights="/tmp/w.pt")
    assert not allowed((), "tests.support.models:tiny_classifier")
    # Set: exactly the list, torchvision names included.
    assert not allowed(("tests.support.models:tiny_classifier",), "vgg19")
    assert allowed(
        ("tests.support.models:tiny_classifier",), "tests.support.models:tiny_classifier"
    )
    assert allowed(("*",), "vgg19") and allowed(("*",), "/models/x.pt")
    # Patterns: a source, or one organisation's Hub models, and nothing beside them.
    hub = ("timm:*", "hf:myorg/*")
    assert allowed(hub, "timm:resnet50") and allowed(hub, "hf:myorg/vit@v1")
    assert not allowed(hub, "hf:other/vit") and not allowed(hub, "vgg19")
