"""The CLI's habits, through the real console script: completion, --version, help with
examples, the config file and its profiles, explain's refusal of remote inputs."""

import json

import pytest

from explainctl import __version__
from tests.support import cli

UNKNOWN_JOB = "01m8m2bepx3dmf8zm3"


def test_completion_scripts_and_answers():
    # Typer's own switch for naming the shell instead of detecting it (as in its tests).
    shown = cli.run("--show-completion", "bash", _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")
    assert shown.returncode == 0, shown.stderr
    assert "_EXPLAINCTL_COMPLETE=complete_bash" in shown.stdout
    answered = cli.run(
        _EXPLAINCTL_COMPLETE="complete_bash", COMP_WORDS="explainctl sub", COMP_CWORD="1"
    )
    assert answered.stdout.split() == ["submit"]
    flags = cli.run(
        _EXPLAINCTL_COMPLETE="complete_bash", COMP_WORDS="explainctl cancel --js", COMP_CWORD="2"
    )
    assert flags.stdout.split() == ["--json"]


def test_version_as_a_flag_and_as_json():
    assert cli.run("--version").stdout == f"{__version__}\n"
    assert cli.run("version").stdout == f"{__version__}\n"
    shown = json.loads(cli.run("version", "--json").stdout)
    assert shown["version"] == __version__ and shown["python"].startswith("3.")


@pytest.mark.parametrize(
    ("command", "example"),
    [
        ("explain", "explainctl explain photos/ --out results/ --model resnet50"),
        ("submit", "explainctl submit audit.csv --chunk-size 32"),
        ("submit", "ls shots/*.jpg | explainctl submit - --target tabby"),
    ],
)
def test_help_shows_examples(command, example):
    shown = cli.run(command, "--help", COLUMNS="200")
    assert shown.returncode == 0 and example in shown.stdout, shown.stdout


def _config(directory):
    """A config file whose profile `off` would fail any command that loads settings."""
    path = directory / "config.toml"
    path.write_text(
        '[profiles.off]\nqueue = "no such queue"\nbroker_url = "redis://127.0.0.1:1/0"\n'
    )
    return path


def test_config_file_and_profile_reach_the_commands_under_env_and_flags(tmp_path, redis_url):
    path = _config(tmp_path)
    env = {"EXPLAINCTL_BROKER_URL": redis_url, "EXPLAINCTL_QUEUE": ""}
    applied = cli.run("--config", str(path), "--profile", "off", "status", UNKNOWN_JOB, **env)
    assert applied.returncode == 2 and "bad queue name" in applied.stderr, applied.stderr
    by_variables = cli.run("status", UNKNOWN_JOB, EXPLAINCTL_CONFIG=str(path),
                           EXPLAINCTL_PROFILE="off", **env)  # fmt: skip
    assert by_variables.returncode == 2 and "bad queue name" in by_variables.stderr
    # The environment's queue and broker win over the profile's...
    env["EXPLAINCTL_QUEUE"] = "explain"
    found = cli.run("--config", str(path), "--profile", "off", "status", UNKNOWN_JOB, **env)
    assert found.returncode == 5 and "no job" in found.stderr, found.stderr
    # ...and a flag over both.
    env["EXPLAINCTL_BROKER_URL"] = "redis://127.0.0.1:1/0"
    flag = cli.run("--config", str(path), "--profile", "off", "status", UNKNOWN_JOB,
                   "--broker", redis_url, **env)  # fmt: skip
    assert flag.returncode == 5 and "no job" in flag.stderr, flag.stderr


def test_config_file_in_the_default_place(tmp_path):
    (tmp_path / "explainctl").mkdir()
    _config(tmp_path / "explainctl")
    env = {"XDG_CONFIG_HOME": str(tmp_path), "EXPLAINCTL_QUEUE": ""}
    applied = cli.run("--profile", "off", "jobs", **env)
    assert applied.returncode == 2 and "bad queue name" in applied.stderr, applied.stderr
    missing = cli.run("--profile", "nope", "jobs", **env)
    assert missing.returncode == 2 and "no profile 'nope' (profiles: off)" in missing.stderr


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("brokr_url = 'x'\n", "'brokr_url' is not a setting"), ("queue = \n", "not valid TOML")],
)
def test_a_bad_config_file_is_one_line(tmp_path, text, fragment):
    path = tmp_path / "config.toml"
    path.write_text(text)
    done = cli.run("jobs", EXPLAINCTL_CONFIG=str(path))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert fragment in lines[0] and str(path) in lines[0]


@pytest.mark.parametrize(
    "remote", ["s3://bucket/photos/", "https://example.org/cat.jpg", "@s3://bucket/list.txt"]
)
def test_explain_refuses_remote_inputs_in_one_line(tmp_path, remote):
    done = cli.run("explain", remote, "--out", str(tmp_path / "o"))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "explain reads local files only" in lines[0] and "explainctl submit" in lines[0]


def test_explain_refuses_remote_entries_of_a_list(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("s3://bucket/cat.jpg\n")
    done = cli.run("explain", str(listing), "--out", str(tmp_path / "o"))
    assert done.returncode == 2 and "not s3://bucket/cat.jpg" in done.stderr, done.stderr


def test_explain_a_saved_dataset_locally_explains_each_rows_label(tmp_path):
    from tests.support import datasets as built

    root = built.saved_dataset(tmp_path / "pets", names=tuple(f"kind {n}" for n in range(10)))
    done = cli.run("explain", f"{root}/train?limit=2", "--out", str(tmp_path / "out"),
                   "--target", "label", "--json", "--model", "tests.support.models:tiny_classifier",
                   "--image-size", "32", "--mask-size", "8", "--iterations", "3")  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(line["item"], line["target_index"]) for line in lines] == [
        ("train-0", 0), ("train-1", 1)]  # fmt: skip
    assert lines[1]["source"] == f"hf-disk:{root}/train#row=1"
    assert (tmp_path / "out" / "train-1" / "mask.npy").exists()
