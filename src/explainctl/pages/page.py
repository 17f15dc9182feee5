"""What the self-contained pages (the audit report, the comparison) share: their base
style (page.css) and the way a job's data enters them, as one JSON block."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from importlib import resources
from typing import Any

# The page's own script: a <script> without attributes (the data block has a type).
_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def content_policy(page: str) -> str:
    """The Content-Security-Policy of `page`: nothing loads from anywhere, images only from
    data: URIs, styles inline, and no script runs but the page's own, by its hash; so even
    a string from a job that slipped past the escaping could not run or call out."""
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"
        for body in _SCRIPT.findall(page)
    )
    return f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src {hashes}"


def render_page(template: str, title: str, data: dict[str, Any]) -> str:
    """The HTML of `template` (a file of templates/) with its title, the shared style,
    `data` as the JSON its script reads, and its Content-Security-Policy."""
    # Every "<" escaped, so no text from a job can end or comment out the script element.
    blob = json.dumps(data).replace("<", "\\u003c")
    files = resources.files("explainctl.pages") / "templates"
    page = (
        files.joinpath(template)
        .read_text()
        .replace("{{STYLE}}", files.joinpath("page.css").read_text().rstrip("\n"))
        .replace("{{TITLE}}", html.escape(title))
    )
    # Hashed before the data goes in: the data block is not a script that runs, and the
    # job's strings must not choose what the policy allows.
    policy = html.escape(content_policy(page), quote=False).replace('"', "&quot;")
    return page.replace("{{CSP}}", policy).replace("{{DATA}}", blob)
