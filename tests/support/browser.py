"""Headless Chromium for report tests (Debian's `chromium`, installed by `make test`)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=5000", "--window-size=1300,1000",
]  # fmt: skip


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    raise RuntimeError("no chromium on PATH: `make test` installs Debian's chromium package")


def _run(page: Path, profile: Path, *extra: str, fragment: str = "") -> subprocess.CompletedProcess:
    url = page.resolve().as_uri() + (f"#{fragment}" if fragment else "")
    return subprocess.run(
        [chromium(), *FLAGS, f"--user-data-dir={profile}", *extra, url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def dump_dom(page: Path, profile: Path, fragment: str = "") -> str:
    """The DOM after the page's scripts ran; `fragment` is the address's part after #."""
    done = _run(page, profile, "--dump-dom", fragment=fragment)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def screenshot(page: Path, profile: Path, out: Path, fragment: str = "") -> np.ndarray:
    done = _run(page, profile, f"--screenshot={out}", fragment=fragment)
    assert done.returncode == 0 and out.exists(), done.stderr[-2000:]
    return np.asarray(Image.open(out).convert("RGB"))


def body_data(dom: str) -> dict[str, str]:
    """The data-* attributes the report's script sets on <body>."""
    body = re.search(r"<body([^>]*)>", dom).group(1)
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body))


def card_values(dom: str) -> dict[str, str]:
    return dict(
        (label, value)
        for value, label in re.findall(
            r'<div class="card" data-count="[^"]*"><b>([^<]*)</b><span>([^<]*)</span>', dom
        )
    )
