"""The client package must import, and its CLI start, on a machine without torch."""

import subprocess
import sys

BLOCK_TORCH = """
import importlib, pkgutil, sys
sys.modules["torch"] = None          # any `import torch` now raises ImportError
sys.modules["torchvision"] = None
import explainctl
names = [m.name for m in pkgutil.walk_packages(explainctl.__path__, "explainctl.")]
for name in names:
    if name != "explainctl.__main__":
        importlib.import_module(name)
print(len(names))
"""


def test_client_modules_import_without_torch():
    done = subprocess.run([sys.executable, "-c", BLOCK_TORCH], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) >= 4


def test_explain_without_worker_extra_says_what_to_install(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")  # the inputs are checked first
    code = (
        "import sys; sys.modules['torch'] = None; sys.argv = ['explainctl', 'explain', 'x.png',"
        f" '--out', {str(tmp_path)!r}]; from explainctl.cli.commands import main; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 4
    assert "explainctl[worker]" in done.stderr and "Traceback" not in done.stderr
