"""Each idea declared once: a method parameter, a result field, a setting, an error code.
These tests catch the forgotten other half (a stale README table, a flag without its
setting, a field the record or `results` leaves out, an undeclared error code)."""

import dataclasses
import re
from pathlib import Path

import pytest
import typer.main

from explainctl.cli import docs
from explainctl.cli.commands import app
from explainctl.cli.options import build_params
from explainctl.config import Settings
from explainctl.pages.comparison import Side
from explainctl.spec.errors import ERROR_CODES, ItemError
from explainctl.spec.methods import (
    METHOD_NAMES,
    ExplainParams,
    default_help,
    flag_of,
    method_info,
    readers,
)
from explainctl.spec.results import (
    COMPARE_FIELDS,
    RESULT_COLUMNS,
    SCORE_FIELDS,
    SORT_KEYS,
    ItemRecord,
    ItemScores,
)

ROOT = Path(__file__).resolve().parents[3]
README = ROOT / "README.md"


def test_readme_tables_are_generated_from_their_declarations():
    text = README.read_text()
    assert set(docs.blocks(text)) == set(docs.TABLES), "a generated table is missing"
    assert docs.render(text) == text, "stale: run python -m explainctl.cli.docs README.md"


def _options(command: str) -> set[str]:
    click_app = typer.main.get_command(app)
    params = click_app.commands[command].params
    return {name for p in params for name in (*p.opts, *p.secondary_opts)}


@pytest.mark.parametrize("command", ["explain", "submit", "demo"])
def test_every_command_that_runs_a_method_has_every_method_flag(command):
    options = _options(command)
    for name in ExplainParams.model_fields:
        if flag := flag_of(name):
            assert set(flag.split("/")) <= options, f"{command}: {flag} missing"
    assert "--param" in options


def test_every_command_answers_json():
    """So that a new command cannot be added without its machine-readable answer."""
    click_app = typer.main.get_command(app)
    assert len(click_app.commands) >= 17
    for name in click_app.commands:
        assert "--json" in _options(name), f"{name}: no --json"


def test_help_gives_each_methods_own_default():
    assert default_help("iterations") == "Default 60 (original 500, paper 300, extremal 800)."
    assert default_help("areas").startswith("extremal only.")


def test_every_parameter_says_what_it_does_and_who_reads_it():
    for name, info in ExplainParams.model_fields.items():
        assert info.description, f"{name}: no help line"
        only = readers()[name]
        assert only is None or set(only) <= set(METHOD_NAMES), name


def test_unknown_parameters_are_errors_never_dropped():
    with pytest.raises(Exception, match="itrations"):
        build_params({"itrations": 5})
    with pytest.raises(Exception, match="unknown parameter 'itrations'"):
        build_params({}, ["itrations=5"])
    with pytest.raises(Exception, match="extra"):
        ExplainParams(itrations=5)


def test_the_original_method_keeps_its_old_name_as_an_alias():
    assert method_info("seed").name == "original" and "original" in METHOD_NAMES
    assert ExplainParams(method="seed").method == "original"
    old = ItemRecord(index=0, uri="a", item="000000-a", state="done", method="seed")
    assert old.method == "original"  # records written before the rename read back


def test_every_score_reaches_the_record_the_columns_and_the_sort_keys():
    record_fields = set(ItemRecord.model_fields)
    for name in SCORE_FIELDS:
        assert name in record_fields, f"{name}: not in the job record"
        assert name in RESULT_COLUMNS, f"{name}: not a results column"
        view = ItemScores.model_fields[name].json_schema_extra
        assert view["label"], f"{name}: no label"
        if view["sort"]:
            assert name in SORT_KEYS
    # A failed item has none of them, and says so with None.
    failed = ItemRecord(index=1, uri="b", item="000001-b", state="failed",
                        error_code="corrupt", error="x")  # fmt: skip
    assert all(getattr(failed, name) is None for name in SCORE_FIELDS)


def test_compare_holds_and_shows_the_scores_declared_for_it_and_no_others():
    held = {item.name for item in dataclasses.fields(Side)}
    assert held & set(SCORE_FIELDS) == set(COMPARE_FIELDS)
    record = ItemRecord(index=0, uri="a", item="000000-a", state="done", target_index=3,
                        target_name="tabby", prob_before=0.9, prob_after=0.2, mask_area=0.3,
                        iterations=40)  # fmt: skip
    shown = Side.of(record).as_json()
    assert {name: shown[name] for name in COMPARE_FIELDS} == {
        name: getattr(record, name) for name in COMPARE_FIELDS
    }
    assert shown["drop"] == pytest.approx(0.7)


def test_the_engine_never_asks_for_a_method_by_name():
    """What sets a method apart is an attribute of its Runner (methods/common.py)."""
    engine = [
        "engine/slots.py",
        "engine/batch.py",
        "explain.py",
        "measures/diagnostics.py",
        "engine/convergence.py",
    ]
    asks = re.compile(r"\.(?:method|variant)\s*(?:==|!=|\bin\b|\bnot in\b)")
    for name in engine:
        text = (ROOT / "src" / "explainctl_worker" / name).read_text()
        assert not asks.findall(text), f"{name}: {asks.findall(text)}"


def test_every_setting_round_trips_through_the_environment_and_has_a_doc_line():
    changed = Settings(
        queue="gpu-a100",
        slots=3,
        allow_http=True,
        allowed_roots=("/data", "/mnt/x"),
        preload=("resnet18", "vgg19"),
    )
    assert Settings.load(env=changed.environment()) == changed
    for item in dataclasses.fields(Settings):
        assert item.metadata.get("doc"), f"{item.name}: no doc line"


def test_every_settings_flag_names_its_variable_in_the_help():
    click_app = typer.main.get_command(app)
    flags = {item.metadata["flag"]: item.name for item in dataclasses.fields(Settings)}
    for command in click_app.commands.values():
        for param in command.params:
            env = re.search(r"\[env (EXPLAINCTL_[A-Z_]+)\]", param.help or "")
            if env:
                name = env.group(1).removeprefix("EXPLAINCTL_").lower()
                assert name in {i.name for i in dataclasses.fields(Settings)}, env.group(1)
            for opt in param.opts:
                if opt in flags and opt != "--device":  # explain's --device is local
                    assert env, f"{command.name} {opt}: a setting's flag without its variable"


def test_loading_settings_starts_nothing(tmp_path):
    settings = Settings.load(env={"EXPLAINCTL_HOME": str(tmp_path)})
    assert settings.broker_url == "" and settings.home_dir == tmp_path
    assert list(tmp_path.iterdir()) == []  # no Redis data, no url file


def test_error_codes_in_the_sources_are_declared():
    sources = [*ROOT.glob("src/**/*.py")]
    patterns = [
        re.compile(r'(?:ItemError|_failure)\(\s*"([a-z-]+)"'),
        re.compile(r'"error_code": "([a-z-]+)"'),
        re.compile(r'error_code(?:, [a-z_.]+)* = "([a-z-]+)"'),
    ]
    texts = [path.read_text() for path in sources]
    used = {code for text in texts for pattern in patterns for code in pattern.findall(text)}
    assert {"render-error", "not-queued", "corrupt"} <= used
    assert used, "the pattern no longer finds the codes"
    assert used <= set(ERROR_CODES), used - set(ERROR_CODES)
    with pytest.raises(ValueError, match="undeclared"):
        ItemError("no-such-code", "x")
