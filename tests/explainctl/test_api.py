"""The Python API's light side (explainctl.api): names reached lazily without torch,
arguments checked with the CLI's one-line errors, tables with or without pandas."""

from __future__ import annotations

import subprocess
import sys

import pytest

import explainctl
from explainctl import api
from explainctl.spec.contracts import Target
from explainctl.spec.errors import InvalidInput

# Makes packages uninstalled for the code after it: their import raises
# ModuleNotFoundError, as it would on a machine without them.
UNINSTALL = """
import sys
class Uninstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Uninstalled())
"""


def _without(modules: list[str], code: str) -> subprocess.CompletedProcess:
    program = f"BLOCKED = {modules!r}\n{UNINSTALL}\n{code}"
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)


def test_the_api_names_come_without_torch_and_a_run_says_what_to_install():
    done = _without(
        ["torch", "torchvision"],
        "import explainctl\n"
        "print(sorted(n for n in explainctl.API if callable(getattr(explainctl, n))))\n"
        "assert 'torch' not in sys.modules\n"
        "try:\n"
        "    explainctl.explain('resnet18', [])\n"
        "except explainctl.api.MissingDependency as error:\n"
        "    print(error)\n",
    )
    assert done.returncode == 0, done.stderr
    names, message = done.stdout.splitlines()
    assert names == str(sorted(explainctl.API))
    assert "explainctl[worker]" in message


def test_tables_are_pyarrow_without_pandas_and_a_clear_error_without_either():
    rows = "[{'item': 'a', 'mask_area': 0.25}, {'item': 'b', 'mask_area': None}]"
    code = f"from explainctl.api import frame\nt = frame({rows}, ['item', 'mask_area'])\n"
    arrow = _without(
        ["pandas"], code + "print(type(t).__name__, t.column('mask_area').to_pylist())"
    )
    assert arrow.returncode == 0, arrow.stderr
    assert arrow.stdout.split() == ["Table", "[0.25,", "None]"]
    neither = _without(["pandas", "pyarrow"], code)
    assert neither.returncode == 1
    assert "a table needs pandas or pyarrow (pip install pandas)" in neither.stderr


def test_parameters_are_checked_as_the_cli_checks_its_flags():
    with pytest.raises(InvalidInput, match="^invalid parameter iterations: "):
        api.params_of(None, {"iterations": 0})
    with pytest.raises(InvalidInput, match="unknown parameter 'iteration'"):
        api.params_of(None, {"iteration": 5})
    assert api.params_of("extremal", {"iterations": 7}).iterations == 7
    with pytest.raises(InvalidInput, match="mean must be three numbers"):
        api.model_spec("resnet18", mean=(0.5, 0.5))
    with pytest.raises(InvalidInput, match="labels must name at least one class"):
        api._labels([])


def test_targets_are_one_for_all_or_one_per_image():
    assert api.targets_of(None) == Target()
    assert api.targets_of(3) == Target(index=3)
    assert api.targets_of("tabby") == Target(name="tabby")
    assert api.targets_of([1, "cat"], 2) == [Target(index=1), Target(name="cat")]
    with pytest.raises(InvalidInput, match="3 targets given for 2 images"):
        api.targets_of([1, 2, 3], 2)
    with pytest.raises(InvalidInput, match="class index is >= 0, not -1"):
        api.targets_of(-1)
