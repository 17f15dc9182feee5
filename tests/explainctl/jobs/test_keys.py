"""The Redis keys and the Lua scripts' contracts (explainctl.jobs.keys), without a Redis."""

import ast
import re
from importlib import resources
from pathlib import Path

import pytest

from explainctl.jobs import keys
from explainctl.spec.contracts import TERMINAL_STATES

ROOT = Path(__file__).resolve().parents[3]
SCRIPTS = sorted(p.name.removesuffix(".lua") for p in (resources.files("explainctl.jobs") / "lua")
                 .iterdir() if p.name.endswith(".lua"))  # fmt: skip


def test_keys_are_byte_identical_to_what_records_already_hold():
    job = "01m95ad3sam61221j7"
    assert keys.JOBS_KEY == "explainctl:jobs"
    assert keys.LEASES_KEY == "explainctl:leases"
    parts = ["meta", "items", "macs", "state", "errors", "attempts", "counts", "deliveries",
             "submitter", "index"]  # fmt: skip
    for part in parts:
        assert keys.job_key(job, part) == f"explainctl:job:{job}:{part}"
    assert keys.job_pattern(job) == f"explainctl:job:{job}:*"
    assert keys.lease_member(job, 3, "ab12cd34") == f"{job}:3:ab12cd34"
    assert keys.lease_key(f"{job}:3:ab12cd34") == f"explainctl:lease:{job}:3:ab12cd34"
    assert keys.reservation_member("t-1") == "reserved:t-1"
    assert keys.lease_key("reserved:t-1") == "explainctl:lease:reserved:t-1"
    assert keys.runner_key(job, 3) == f"explainctl:runner:{job}:3"


def test_no_module_but_keys_spells_a_key():
    spelled = []
    for path in (ROOT / "src").rglob("*.py"):
        if path.name == "keys.py":
            continue
        tree = ast.parse(path.read_text())
        docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and id(node) not in docs and "explainctl:" in node.value):  # fmt: skip
                spelled.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert spelled == []


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_opens_with_its_contract(name):
    script = keys.Script(name)
    text = script.text
    assert script.contract.keys and script.contract.args, f"{name}.lua names no KEYS or ARGV"
    # The header (the opening comment block) holds the whole contract and what it returns.
    header = text[: text.index("\n\n", text.index("-- Returns"))]
    assert all(line.startswith("--") for line in header.splitlines())
    body = text[len(header) :]
    for used in re.findall(r"(KEYS|ARGV)\[(\d+)\]", body):
        table, number = used[0], int(used[1])
        names = script.contract.keys if table == "KEYS" else script.contract.args
        assert number <= len(names), f"{name}.lua uses {table}[{number}], not in its header"
    # Item states come from contracts.TERMINAL_STATES, as ARGV, never spelled in Lua.
    for state in TERMINAL_STATES:
        assert f"'{state}'" not in body and f'"{state}"' not in body, f"{name}.lua: {state}"


def test_every_script_is_used():
    sources = [
        (ROOT / "src/explainctl/jobs/store.py").read_text(),
        (ROOT / "src/explainctl_worker/service/lease.py").read_text(),
        (ROOT / "src/explainctl/jobs/leases.py").read_text(),
    ]
    for name in SCRIPTS:
        assert any(f'Script("{name}")' in source for source in sources), name


def test_a_script_is_called_by_name_and_refuses_a_wrong_name():
    seal = keys.Script("seal")
    assert seal.contract.keys == ("meta", "index", "records") and seal.contract.keys_tail
    named = {"index": "i", "records": ["r1", "r2"], "meta": "m"}  # any order
    assert seal.keys(**named) == ["m", "i", "r1", "r2"]
    with pytest.raises(TypeError, match="missing \\['index'\\], unexpected \\['idx'\\]"):
        seal.keys(meta="m", idx="i", records=[])
    claim = keys.Script("claim")
    assert claim.args(expiry=3, now=2, lease="l") == ["l", 2, 3]


def test_a_header_out_of_order_is_refused():
    with pytest.raises(ValueError, match="out of order"):
        keys._contract("x", "-- KEYS[1] a  one\n-- KEYS[3] b  two\n")
    with pytest.raises(ValueError, match="out of order"):
        keys._contract("x", "-- KEYS[1..] a  many\n-- KEYS[2] b  one more\n")


def test_the_lua_files_ship_with_the_package():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^"explainctl.jobs" = \[.*"lua/\*\.lua"', pyproject, re.MULTILINE)
