"""The README's generated tables: each is derived from the declaration it documents.

`python -m explainctl.cli.docs README.md` rewrites every block between
`<!-- generated:NAME -->` and `<!-- /generated -->`; a test fails when one is stale.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

from explainctl.config import markdown_table as settings_table
from explainctl.spec.errors import markdown_error_codes
from explainctl.spec.methods import markdown_methods, markdown_parameters
from explainctl.spec.results import markdown_fields
from explainctl.spec.trust import markdown_flags

TABLES: dict[str, Callable[[], str]] = {
    "settings": settings_table,
    "methods": markdown_methods,
    "parameters": markdown_parameters,
    "result-fields": markdown_fields,
    "error-codes": markdown_error_codes,
    "trust-flags": markdown_flags,
}
_BLOCK = re.compile(r"(<!-- generated:([a-z-]+) -->\n)(.*?)(<!-- /generated -->)", re.S)


def render(text: str) -> str:
    """`text` with every generated block rewritten from its declaration."""

    def fill(match: re.Match) -> str:
        return match.group(1) + TABLES[match.group(2)]() + "\n" + match.group(4)

    return _BLOCK.sub(fill, text)


def blocks(text: str) -> list[str]:
    """The names of the generated blocks in `text`."""
    return [m.group(2) for m in _BLOCK.finditer(text)]


if __name__ == "__main__":
    for name in sys.argv[1:]:
        path = Path(name)
        path.write_text(render(path.read_text()))
