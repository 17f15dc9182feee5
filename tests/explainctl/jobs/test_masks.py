"""Chunk masks files: written once per chunk attempt, read once for all its items."""

import threading

import numpy as np
import pytest

from explainctl.jobs.masks import MaskReader, decode, encode
from explainctl.spec.contracts import MASK_NPY, chunk_masks_key
from explainctl.spec.results import ItemRecord


def _npy(array) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_a_chunk_file_holds_each_items_mask_by_index():
    masks = {7: np.random.rand(5, 6).astype(np.float32), 3: np.zeros((5, 6), np.float32)}
    back = decode(encode(masks))
    assert sorted(back) == [3, 7]
    assert np.array_equal(back[7], masks[7]) and back[7].dtype == np.float32


def test_masks_of_different_shapes_get_no_chunk_file():
    assert encode({0: np.zeros((4, 4)), 1: np.zeros((5, 5))}) is None
    assert encode({}) is None


def test_anything_else_is_refused_in_one_line():
    with pytest.raises(ValueError, match="not a chunk masks file"):
        decode(b"PK\x03\x04 not really")
    with pytest.raises(ValueError, match="not a chunk masks file"):
        decode(_npy(np.zeros((2, 2))))


def test_a_small_compressed_file_of_huge_masks_is_refused_before_it_unpacks():
    import io

    buffer = io.BytesIO()
    np.savez_compressed(buffer, index=np.arange(1), masks=np.zeros((1, 2000, 2000), np.float32))
    bomb = buffer.getvalue()
    assert len(bomb) < 100_000  # 16 MB of zeros, compressed
    with pytest.raises(ValueError, match="above 1000 values each"):
        decode(bomb, max_pixels=1000)
    reader = MaskReader(lambda uri: bomb, max_pixels=1000)
    record = ItemRecord(index=0, uri="/a.png", item="000000-a", state="done",
                        mask_file="/out/job/masks/000000000-000000000-0000000-ab.npz")  # fmt: skip
    with pytest.raises(ValueError):
        reader.mask(record)


def test_the_key_names_the_chunk_as_its_part_does():
    assert chunk_masks_key("J", 16, 31, 1, "ab12") == "J/masks/000000016-000000031-0000001-ab12.npz"


def _record(index: int, **fields) -> ItemRecord:
    return ItemRecord(index=index, uri=f"/i/{index}.png", item=f"{index:06d}-x", state="done",
                      **fields)  # fmt: skip


def test_the_reader_fetches_a_chunk_once_for_concurrent_readers_and_falls_back_to_mask_npy():
    masks = {i: np.full((3, 3), i / 10, np.float32) for i in range(8)}
    files = {"chunk.npz": encode(masks), "old/mask.npy": _npy(np.ones((3, 3), np.float32))}
    reads: list[str] = []
    lock = threading.Lock()

    def read(uri: str) -> bytes:
        with lock:
            reads.append(uri)
        return files[uri]

    reader = MaskReader(read)
    got: dict[int, np.ndarray] = {}
    threads = [
        threading.Thread(
            target=lambda i=i: got.__setitem__(i, reader.mask(_record(i, mask_file="chunk.npz")))
        )  # fmt: skip
        for i in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(np.array_equal(got[i], masks[i]) for i in range(8))
    old = _record(9, artifacts={MASK_NPY: "old/mask.npy"})
    assert reader.mask(old).tolist() == np.ones((3, 3)).tolist()
    assert reads == ["chunk.npz", "old/mask.npy"]
    assert reader.mask(_record(10)) is None  # no mask anywhere
