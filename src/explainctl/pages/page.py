"""What the self-contained pages (the audit report, the comparison) share: their base
style (page.css) and the way a job's data enters them, as one JSON block."""

from __future__ import annotations

import html
import json
from importlib import resources
from typing import Any


def render_page(template: str, title: str, data: dict[str, Any]) -> str:
    """The HTML of `template` (a file of templates/) with its title, the shared style
    and `data` as the JSON its script reads."""
    # Every "<" escaped, so no text from a job can end or comment out the script element.
    blob = json.dumps(data).replace("<", "\\u003c")
    files = resources.files("explainctl.pages") / "templates"
    return (
        files.joinpath(template)
        .read_text()
        .replace("{{STYLE}}", files.joinpath("page.css").read_text().rstrip("\n"))
        .replace("{{TITLE}}", html.escape(title))
        .replace("{{DATA}}", blob)
    )
