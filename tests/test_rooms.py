"""The house's rooms and which may import which, pinned: the README's layout map in code.

Every import in every module of both packages, module level and inside functions, is
read from the source (nothing is imported), mapped to the room it lands in, and checked
against ROOMS. A room is a subpackage (`explainctl.spec`); the modules at a package's top
(`explainctl.config`, `explainctl_worker.explain`) form the room named by the package.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# room -> the rooms it may import (besides itself). The light side is everything under
# explainctl; it reaches the worker only lazily, from the rooms that run it: cli, local,
# and the root's Python API (api.py), which forwards a notebook's calls to it.
ROOMS: dict[str, set[str]] = {
    "explainctl.spec": set(),
    "explainctl.io": {"explainctl.spec"},
    "explainctl": {
        "explainctl.spec",
        "explainctl.io",
        "explainctl.jobs",
        "explainctl.pages",
        "explainctl.exports",
        "explainctl.local",
        "explainctl.cli",
        "explainctl_worker",
    },  # fmt: skip
    "explainctl.jobs": {"explainctl", "explainctl.spec", "explainctl.io"},
    "explainctl.pages": {"explainctl.spec", "explainctl.io", "explainctl.jobs"},
    "explainctl.exports": {"explainctl.spec", "explainctl.io", "explainctl.jobs"},
    "explainctl.local": {"explainctl", "explainctl.spec", "explainctl_worker"},
    "explainctl.cli": {
        "explainctl",
        "explainctl.spec",
        "explainctl.io",
        "explainctl.jobs",
        "explainctl.pages",
        "explainctl.exports",
        "explainctl.local",
        "explainctl_worker",
    },  # fmt: skip
    "explainctl_worker.methods": {"explainctl.spec"},
    "explainctl_worker.measures": {"explainctl.spec", "explainctl_worker.methods"},
    "explainctl_worker.engine": {
        "explainctl.spec",
        "explainctl_worker.methods",
        "explainctl_worker.measures",
    },  # fmt: skip
    "explainctl_worker": {
        "explainctl",
        "explainctl.spec",
        "explainctl.io",
        "explainctl.jobs",
        "explainctl.local",
        "explainctl_worker.engine",
        "explainctl_worker.methods",
        "explainctl_worker.measures",
        "explainctl_worker.service",
    },  # fmt: skip
    "explainctl_worker.service": {
        "explainctl",
        "explainctl.spec",
        "explainctl.io",
        "explainctl.jobs",
        "explainctl_worker",
    },  # fmt: skip
}
# The root modules some rooms may import: `explainctl` as a room is mostly the library's
# front (client), which only cli and local use; jobs and the worker read config alone.
ROOT_MODULES_FOR = {
    "explainctl.jobs": {"explainctl.config"},
    "explainctl_worker.service": {"explainctl.config"},
}
HEAVY = ("torch", "torchvision", "explainctl_worker")


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _room(module: str) -> str:
    parts = module.split(".")
    package = ".".join(parts[:2])
    return package if package in ROOMS else parts[0]


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level) for every import in the file."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [n if n in MODULES else node.module for n in names]
        else:
            continue
        found += [(name, id(node) in top) for name in names]
    return found


def test_every_module_lives_in_a_declared_room():
    assert {_room(m) for m in MODULES} == set(ROOMS)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_imports_only_the_rooms_its_room_may(module):
    room = _room(module)
    for name, _ in _imports(MODULES[module]):
        if not name.startswith("explainctl") or name not in MODULES and "." not in name:
            continue
        target = _room(name)
        if target == room:
            continue
        assert target in ROOMS[room], f"{module} imports {name}: {room} may not import {target}"
        if target == "explainctl" and room in ROOT_MODULES_FOR:
            assert name in ROOT_MODULES_FOR[room], f"{module} imports {name}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.split(".")[0] == "explainctl"))
def test_the_light_side_reaches_torch_and_the_worker_only_lazily(module):
    eager = [name for name, top in _imports(MODULES[module]) if top]
    assert not [name for name in eager if name.split(".")[0] in HEAVY], module
