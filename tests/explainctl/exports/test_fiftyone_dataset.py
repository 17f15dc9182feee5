"""Where a FiftyOne sample's image comes from (no FiftyOne needed for this part)."""

from pathlib import Path

from explainctl.exports.fiftyone_dataset import _Media
from explainctl.spec.errors import ItemError
from explainctl.spec.results import ItemRecord


def _record(index: int, uri: str, staged: str | None = None) -> ItemRecord:
    return ItemRecord(index=index, uri=uri, item=f"{index:06d}-x", state="done", staged=staged)


def test_staged_rows_are_downloaded_local_inputs_stay_and_refused_ones_are_missing(tmp_path):
    local = tmp_path / "cat.png"
    local.write_bytes(b"local image")
    refused = tmp_path / "private.png"
    refused.write_bytes(b"not for the auditor")
    staged = "s3://audit/job/inputs/000001-test-1.png"
    objects = {staged: b"staged row", str(local): b"local image"}

    def read(uri: str) -> bytes:  # the client's reader: what it does not allow, it refuses
        if uri not in objects:
            raise ItemError("outside-allowed-roots", "no")
        return objects[uri]

    media = _Media(tmp_path / "media", "job", read)
    assert media.path(_record(0, str(local))) == str(local.resolve())
    row = media.path(_record(1, "parquet:/data/test.parquet#row=1", staged))
    assert Path(row).read_bytes() == b"staged row" and media.downloaded == 1
    # A row with no staged image, and a path the reader refuses: no file, counted missing.
    assert not Path(media.path(_record(2, "hf://datasets/o/n/default/test#row=2"))).exists()
    assert not Path(media.path(_record(3, str(refused)))).exists()
    assert media.missing == 2
