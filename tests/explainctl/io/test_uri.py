"""within_roots: where a worker may write, for directories and S3 prefixes."""

import pytest

from explainctl.io.uri import within_roots

ROOTS = ("s3://audits/jobs", "s3://scratch")


@pytest.mark.parametrize(
    ("uri", "inside"),
    [
        ("s3://audits/jobs", True),
        ("s3://audits/jobs/2026/", True),
        ("s3://audits/jobs-other", False),
        ("s3://audits", False),
        ("s3://audits/jobs/../secrets", False),
        ("s3://scratch/anything", True),
        ("s3://elsewhere/jobs", False),
        ("/tmp/jobs", False),
        ("https://audits/jobs", False),
    ],
)
def test_an_s3_output_is_inside_its_prefix_by_whole_segments(uri, inside):
    assert within_roots(uri, ROOTS) is inside


def test_a_directory_output_is_judged_where_it_really_leads(tmp_path):
    allowed = tmp_path / "outputs"
    allowed.mkdir()
    (allowed / "escape").symlink_to(tmp_path)
    assert within_roots(str(allowed / "job" / "new"), [str(allowed)])
    assert not within_roots(str(allowed / ".." / "other"), [str(allowed)])
    assert not within_roots(str(allowed / "escape" / "other"), [str(allowed)])
    assert not within_roots(f"file://{tmp_path}/outputs-2", [str(allowed)])
