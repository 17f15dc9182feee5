"""Running the real `explainctl` console script in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXPLAINCTL = str(Path(sys.executable).parent / "explainctl")


def env(**extra: str) -> dict[str, str]:
    """The test environment, with the repo root importable so `tests.support.models:…`
    specs load."""
    result = dict(os.environ)
    result["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), result.get("PYTHONPATH", "")]))
    result.update(extra)
    return result


def run(*args: str, timeout: float = 300, input: str | None = None, **extra: str):
    return subprocess.run(
        [EXPLAINCTL, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(**extra),
        input=input,
    )


def start(*args: str, **extra: str) -> subprocess.Popen:
    """The command running in the background (stdout and stderr piped, as text)."""
    return subprocess.Popen(
        [EXPLAINCTL, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(**extra),
    )
