"""The precision of the model's passes: `auto` resolved per device, bf16 autocast kept to
the model, and the precision used recorded with each result."""

import json

import torch

from explainctl.spec.contracts import ModelSpec
from explainctl.spec.methods import ExplainParams
from explainctl_worker.engine import precision
from explainctl_worker.engine.batch import explain_batch
from explainctl_worker.local_files import explain_paths
from explainctl_worker.model import LoadedModel
from tests.support.models import tiny_classifier


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    def cpu(name: str, flags: str) -> str:
        path = tmp_path / name
        path.write_text(f"processor : 0\nmodel name : x\nflags : fpu {flags}\n")
        return str(path)

    assert precision.cpu_has_bf16(cpu("amx", "avx2 avx512f amx_bf16 amx_tile"))
    assert precision.cpu_has_bf16(cpu("zen4", "avx2 avx512f avx512_bf16"))
    assert not precision.cpu_has_bf16(cpu("old", "avx2 avx512f"))
    assert not precision.cpu_has_bf16(str(tmp_path / "missing"))


def test_explicit_precisions_are_kept_and_auto_follows_the_cpu():
    cpu = torch.device("cpu")
    assert precision.resolve("fp32", cpu) == "fp32"
    assert precision.resolve("bf16", cpu) == "bf16"
    expected = "bf16" if precision.cpu_has_bf16() else "fp32"
    assert precision.resolve("auto", cpu) == expected


def test_bf16_runs_the_model_in_bf16_and_keeps_the_mask_in_fp32():
    seen = []
    model = tiny_classifier()
    model.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    params = ExplainParams(
        method="decisive", iterations=10, push_steps=10, mask_size=8, image_size=32,
        precision="bf16",
    )  # fmt: skip
    result = explain_batch(model, torch.rand(2, 3, 32, 32), params)
    assert torch.bfloat16 in seen
    assert result.masks.dtype == torch.float32 and result.scores["precision"] == ["bf16", "bf16"]
    fp32 = explain_batch(
        model, torch.rand(2, 3, 32, 32), params.model_copy(update={"precision": "fp32"})
    )
    assert fp32.scores["precision"] == ["fp32", "fp32"]


def test_result_json_records_the_precision_the_passes_ran_in(tmp_path):
    from PIL import Image

    image = tmp_path / "a.png"
    Image.new("RGB", (40, 40), (120, 30, 200)).save(image)
    loaded = LoadedModel(tiny_classifier(), ModelSpec(name="tiny"), torch.device("cpu"), None)
    for wanted in ("fp32", "bf16", "auto"):
        params = ExplainParams(
            method="decisive", iterations=10, push_steps=10, mask_size=8, image_size=32,
            precision=wanted,
        )  # fmt: skip
        (outcome,) = explain_paths([str(image)], str(tmp_path / wanted), loaded, params)
        used = precision.resolve(wanted, torch.device("cpu"))
        assert outcome.result.precision == used
        recorded = json.loads(outcome.files["result.json"])
        assert (recorded["precision"], recorded["params"]["precision"]) == (used, wanted)
