"""`explainctl explain`: local image files explained on this machine, into OUT/<name>/,
through the same pipeline as a queued chunk (explain.py)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from explainctl.io.sources import SourcePolicy, read_source
from explainctl.spec.contracts import Target, is_source_id, item_name
from explainctl.spec.methods import ExplainParams
from explainctl_worker.decode import DecodeLimits
from explainctl_worker.explain import ItemInput, ItemOutcome, Timings, explain_items
from explainctl_worker.model import LoadedModel


def local_item_names(paths: Sequence[str]) -> list[str]:
    """Folder names for local files: the file stem, made safe and unique (`cat`, `cat-2`)."""
    names: list[str] = []
    seen: set[str] = set()
    for path in paths:
        # A dataset row's source id: its file or split and its row (`test-42`).
        stem = item_name(0, path).partition("-")[2] if is_source_id(path) else Path(path).stem
        stem = stem or "image"
        base = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem).strip(".") or "image"
        name, suffix = base, 2
        while name in seen:
            name, suffix = f"{base}-{suffix}", suffix + 1
        seen.add(name)
        names.append(name)
    return names


def _reader(path: str, policy: SourcePolicy) -> Callable[[], bytes]:
    return lambda: read_source(path, policy)


def write_outcome(out_dir: str, outcome: ItemOutcome) -> None:
    """An explained item's files into OUT/<name>/, replacing any earlier ones."""
    folder = Path(out_dir) / outcome.name
    folder.mkdir(parents=True, exist_ok=True)
    for filename, data in outcome.files.items():
        (folder / filename).write_bytes(data)


def explain_paths(
    paths: Sequence[str],
    out_dir: str,
    loaded: LoadedModel,
    params: ExplainParams,
    *,
    target: Target | None = None,
    targets: Sequence[Target | None] | None = None,
    labels: Sequence[str | None] | None = None,
    data: Sequence[bytes | None] | None = None,
    batch_size: int | None = None,
    limits: DecodeLimits | None = None,
    on_progress: Callable[[int], None] | None = None,
    timings: Timings | None = None,
) -> Iterator[ItemOutcome]:
    """Explain local image files through `batch_size` slots (default: slot.choose_slots),
    writing OUT/<name>/ for each; yields outcomes in the order of `paths`.

    `targets`, where given, holds each path's own target (a list's `target` column); None
    there, or no `targets`, means `target`. `labels`, where given, holds each path's
    ground truth (a list's `label` column); `data` a dataset row's image bytes in place
    of reading the path (which is then the row's source id). on_progress receives the number of
    image-iterations done since the last call.
    """
    limits = limits or DecodeLimits()
    policy = SourcePolicy(max_bytes=limits.max_bytes)  # the user's own files: no roots
    names = local_item_names(paths)
    fallback = target or Target()
    own = targets if targets is not None else [None] * len(paths)
    truths = labels if labels is not None else [None] * len(paths)
    held = data if data is not None else [None] * len(paths)
    items = [
        ItemInput(
            name,
            path if raw is not None else os.path.abspath(path),
            _reader(path, policy) if raw is None else (lambda raw=raw: raw),
            mine or fallback,
            truth,
        )
        for name, path, mine, truth, raw in zip(names, paths, own, truths, held, strict=True)
    ]

    # Slots are refilled across the whole list; results are yielded a window at a time
    # so a long list shows outcomes as it goes and holds few decoded images at once.
    window = max((batch_size or 1) * 8, 64)
    for start in range(0, len(items), window):
        part = items[start : start + window]
        yield from explain_items(
            part,
            loaded,
            params,
            limits,
            slots=batch_size,
            deliver=lambda outcome: write_outcome(out_dir, outcome),
            progress=on_progress,
            timings=timings,
        )
