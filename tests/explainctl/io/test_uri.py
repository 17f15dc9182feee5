"""URIs: what one looks like once written down (no user info, query or fragment of a URL),
and where a worker may write (directories and S3 prefixes)."""

import pytest

from explainctl.io.uri import redacted, within_roots


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("https://host/a.png?X-Amz-Signature=abc&X-Amz-Credential=k", "https://host/a.png"),
        ("https://user:pw@host/p", "https://host/p"),
        ("HTTP://u:p@h:8080/a@b.png?x=1#frag", "HTTP://h:8080/a@b.png"),
        ("http://u:p@host", "http://host"),
        ("file:///data/a.png?token=1", "file:///data/a.png"),
        ("s3://AKIA:secret@bucket/key.png", "s3://bucket/key.png"),
        # "?" and "#" in an S3 key or a plain path are part of the name
        ("s3://bucket/odd key?+%#.png", "s3://bucket/odd key?+%#.png"),
        ("/data/what?.png", "/data/what?.png"),
    ],
)
def test_secrets_leave_a_uri_and_names_stay(given, kept):
    assert redacted(given) == kept
    assert redacted(kept) == kept


def test_a_dataset_rows_id_keeps_its_row():
    row = "hf://datasets/org/name/default/test#row=42"
    assert redacted(row) == row


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
