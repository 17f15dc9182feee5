"""What a URI looks like once written down: no user info, query or fragment of a URL."""

import pytest

from explainctl.io.uri import redacted


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
