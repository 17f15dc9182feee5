"""Small datasets built offline: a parquet file, a saved Hugging Face dataset and a
webdataset shard, each of a few 32 px images with labels."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def png(seed: int, size: int = 32) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def patch(colour: tuple[int, int, int], size: int = 32) -> bytes:
    """Grey with a square of `colour` in the middle (a patch, not a flat image, so that
    blurring it away changes what a model sees)."""
    pixels = np.full((size, size, 3), 128, dtype=np.uint8)
    pixels[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = colour
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def parquet(path: Path, n: int = 3, **columns: list) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = {"image": [png(i) for i in range(n)], "label": [str(i % 2) for i in range(n)]}
    pq.write_table(pa.table({**table, **columns}), path, row_group_size=2)
    return path


def saved_dataset(
    path: Path,
    names: tuple[str, ...] = ("cat", "dog"),
    n: int = 3,
    images: list[bytes] | None = None,
    labels: list[int] | None = None,
) -> Path:
    """A DatasetDict (train: n rows, or one per image given; test: 1) saved to disk, its
    labels a ClassLabel."""
    import datasets

    features = datasets.Features(
        {"picture": datasets.Image(), "label": datasets.ClassLabel(names=list(names))}
    )
    images = images if images is not None else [png(i) for i in range(n)]
    labels = labels if labels is not None else [i % len(names) for i in range(len(images))]
    rows = {"picture": [{"bytes": image, "path": None} for image in images], "label": labels}
    train = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": train, "test": train.select([0])}).save_to_disk(str(path))
    return path


def shard(path: Path, samples: dict[str, tuple[bytes, str | None]]) -> Path:
    """A webdataset tar: KEY.png and, where a label is given, KEY.cls."""
    with tarfile.open(path, "w") as tar:
        for key, (image, label) in samples.items():
            members = [("png", image)] + ([("cls", label.encode())] if label is not None else [])
            for extension, data in members:
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path
