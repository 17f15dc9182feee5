"""The README's notebook example runs as written.

Its first fenced Python block under "Python API (notebooks)" runs in a fresh interpreter,
offline, on the bundled photos. The one substitution is the model: the example reads
EXPLAINCTL_EXAMPLE_MODEL explicitly (its comment says so), set here to a tiny model.
"""

import re
import subprocess
import sys

from tests.support import cli

SECTION = "## Python API (notebooks)"


def notebook_example() -> str:
    text = (cli.ROOT / "README.md").read_text()
    section = text[text.index(SECTION) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_notebook_example_runs_as_written(tmp_path):
    code = notebook_example()
    assert 'load_model(os.environ.get("EXPLAINCTL_EXAMPLE_MODEL"' in code
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env=cli.env(
            EXPLAINCTL_EXAMPLE_MODEL="tests.support.models:tiny_classifier", OMP_NUM_THREADS="1"
        ),
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "(3, 28, 28)"
    assert lines[1] == "[(300, 451), (400, 600), (427, 640)]"
    assert "torch.Size([2, 1, 64, 64])" in lines
    assert sorted(p.name for p in (tmp_path / "explained").iterdir()) == [
        "chelsea", "coffee", "rocket",
    ]  # fmt: skip
    assert (tmp_path / "explained" / "rocket" / "mask.npy").is_file()
