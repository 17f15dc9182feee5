import pytest

from explainctl.spec.errors import InvalidInput
from explainctl.spec.ids import check_job_id, created_at, new_job_id


def test_ids_sort_by_creation_time_and_are_url_safe():
    ids = [new_job_id(now=1_700_000_000 + step * 0.001) for step in range(50)]
    assert ids == sorted(ids)
    assert all(len(i) == 18 and i.isalnum() and i == i.lower() for i in ids)
    assert len(set(new_job_id(now=1_700_000_000) for _ in range(100))) == 100


def test_created_at_round_trips():
    assert created_at(new_job_id(now=1_700_000_123.456)) == pytest.approx(1_700_000_123.456)


@pytest.mark.parametrize(
    "bad", ["", "../etc", "ABCDEFGHJKMNPQRSTV", "0123456789abcdefgh/", "u" * 18]
)
def test_check_job_id_rejects_anything_else(bad):
    with pytest.raises(InvalidInput):
        check_job_id(bad)


def test_a_trailing_newline_is_not_a_job_id():
    with pytest.raises(InvalidInput):
        check_job_id(new_job_id() + "\n")
