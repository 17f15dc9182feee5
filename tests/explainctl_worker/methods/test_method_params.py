"""ExplainParams for the methods: defaults filled per method, refused combinations."""

import pytest
from pydantic import ValidationError

from explainctl.cli.options import build_params
from explainctl.spec.errors import InvalidInput
from explainctl.spec.methods import ExplainParams
from explainctl.spec.results import ItemRecord


def test_original_defaults_are_unchanged_and_seed_is_its_alias():
    params = ExplainParams(method="original")
    assert params.method == "original"
    assert ExplainParams(method="seed") == params  # its name before 0.2
    assert (params.iterations, params.lr, params.l1_coeff, params.tv_coeff) == (500, 0.1, 0.01, 0.2)
    assert (params.noise_std, params.upsample, params.jitter) == (0.2, "bilinear", 0)
    assert params.blur_levels is None and params.areas is None and params.variant is None
    assert params.metrics is False and params.metric_steps is None


def test_paper_defaults_are_the_papers_and_explicit_values_win():
    params = ExplainParams(method="paper")
    assert (params.iterations, params.lr, params.mask_size) == (300, 0.1, 28)
    assert (params.l1_coeff, params.tv_coeff, params.tv_beta) == (1e-4, 1e-2, 3.0)
    assert (params.noise_std, params.jitter, params.upsample) == (0.0, 4, "nearest")
    assert (params.blur_sigma, params.blur_levels) == (10.0, 8)
    mine = ExplainParams(method="paper", iterations=50, jitter=0)
    assert (mine.iterations, mine.jitter, mine.lr) == (50, 0, 0.1)
    assert ExplainParams(method=" Paper ").iterations == 300


def test_extremal_defaults_follow_the_image_size():
    params = ExplainParams(method="extremal")
    assert (params.iterations, params.lr, params.momentum) == (800, 0.01, 0.9)
    assert params.areas == (0.1,) and params.variant == "preserve"
    assert (params.area_coeff, params.area_growth) == (300.0, 1.0035)
    assert (params.blur_sigma, params.blur_levels, params.noise_std) == (20.0, 8, 0.0)
    assert params.mask_size == 32  # one parameter per 7 px of 224
    assert ExplainParams(method="extremal", image_size=64).mask_size == 9


def test_recorded_params_read_back_identically():
    for params in (
        ExplainParams(method="paper", iterations=7),
        ExplainParams(method="extremal", areas=(0.05, 0.2), variant="dual", metrics=True),
    ):
        assert ExplainParams.model_validate_json(params.model_dump_json()) == params
        hash(params)  # payloads and caches may hash them


def test_command_line_strings_become_typed_params():
    params = build_params(
        {"iterations": None},
        ["method=extremal", "areas=0.05, 0.1", "variant=Dual", "metrics=true", "metric-steps=56"],
    )
    assert params.method == "extremal" and params.areas == (0.05, 0.1)
    assert params.variant == "dual" and params.metrics is True and params.metric_steps == 56


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"method": "lime"}, "method"),
        ({"method": "extremal", "areas": (0.0,)}, "between 0 and 1"),
        ({"method": "extremal", "areas": "0.2,1.5"}, "between 0 and 1"),
        ({"method": "extremal", "areas": ()}, "areas"),
        ({"method": "extremal", "variant": "both"}, "variant"),
        ({"areas": (0.1,)}, "areas: applies only to method extremal"),
        ({"method": "paper", "variant": "delete"}, "variant: applies only"),
        ({"blur_levels": 4}, "blur_levels: applies only to method paper and extremal"),
        ({"method": "extremal", "early_stop": True}, "early_stop"),
        ({"method": "extremal", "l1_coeff": 0.1}, "has none"),
        ({"method": "extremal", "area_growth": 0.9}, "area_growth"),
        ({"method": "paper", "blur_sigma": 500}, "blur_sigma"),
        ({"image_size": 8, "mask_size": 8, "metric_steps": 65}, "metric_steps"),
        ({"metric_batch": 0}, "metric_batch"),
    ],
)
def test_bad_combinations_are_refused(values, fragment):
    with pytest.raises(ValidationError, match=fragment):
        ExplainParams(**values)


def test_submit_time_errors_are_one_line():
    with pytest.raises(InvalidInput, match="areas: areas must lie strictly between 0 and 1"):
        build_params({}, ["method=extremal", "areas=2"])
    with pytest.raises(InvalidInput, match="^invalid parameter areas: applies only to method"):
        build_params({}, ["areas=0.1"])


def test_records_carry_the_metrics():
    record = ItemRecord(
        index=0,
        uri="a.png",
        item="000000-a",
        state="done",
        method="paper",
        deletion_auc=0.2,
        deletion_auc_blur=0.4,
        insertion_auc=0.7,
        prob_keep=0.9,
    )
    assert ItemRecord.model_validate_json(record.model_dump_json()) == record
    assert ItemRecord(index=0, uri="a", item="a", state="queued").deletion_auc is None
