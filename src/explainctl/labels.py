"""Class names for a model that has none of its own (`--labels FILE`).

A labels file is one class name per line (line n names class n - 1), or a JSON list of
strings. The names are recorded with the job (JobInfo.labels: Redis and job.json), so
workers resolve `--target NAME` and write `target_name` with them, and `results`, the
report and `compare` read them back from the records.
"""

from __future__ import annotations

import json

from explainctl.io.sources import SourcePolicy, read_source
from explainctl.spec.errors import InvalidInput, ItemError

MAX_LABELS = 100_000
MAX_LABEL_CHARS = 200
# The names live in the job's record, read on every status: ImageNet-21k's fit in this.
MAX_FILE_BYTES = 1024 * 1024


def parse_labels(text: str, where: str = "labels") -> tuple[str, ...]:
    """The class names in `text` (a JSON list, or one name per line), checked."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            names = json.loads(stripped)
        except json.JSONDecodeError as error:
            raise InvalidInput(
                f"{where}: not a JSON list ({error.msg}, line {error.lineno})"
            ) from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise InvalidInput(f"{where}: a JSON labels file must be a list of strings")
    else:
        names = text.splitlines()
        # A trailing newline is not a nameless last class.
        while names and not names[-1].strip():
            names.pop()
    names = [name.strip() for name in names]
    if not names:
        raise InvalidInput(f"{where}: no class names")
    if len(names) > MAX_LABELS:
        raise InvalidInput(f"{where}: {len(names)} class names, more than {MAX_LABELS}")
    for number, name in enumerate(names):
        if not name:
            raise InvalidInput(f"{where}: class {number} has an empty name")
        if len(name) > MAX_LABEL_CHARS:
            raise InvalidInput(f"{where}: class {number}'s name is over {MAX_LABEL_CHARS} chars")
    return tuple(names)


def read_labels(uri: str | None) -> tuple[str, ...] | None:
    """The labels file at `uri`, a path or s3:// (None: the model's own names, if any)."""
    if uri is None:
        return None
    try:
        data = read_source(uri, SourcePolicy(max_bytes=MAX_FILE_BYTES))
    except ItemError as error:
        raise InvalidInput(f"cannot read the labels file: {error.message}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidInput(f"the labels file {uri} is not UTF-8 text") from None
    return parse_labels(text, where=uri)
