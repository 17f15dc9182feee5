"""The config file as one layer of Settings.load: flag > environment > file > default."""

import re
from pathlib import Path

import pytest

from explainctl.config import Settings
from explainctl.spec.errors import InvalidInput

FILE = """
queue = "from-file"
slots = 2
preload = ["resnet18", "vgg19"]
allow_http = true

[profiles.gpu]
queue = "gpu"
device = "cuda"
"""


@pytest.fixture
def home(tmp_path):
    """An XDG config home holding explainctl/config.toml, and the environment naming it."""
    (tmp_path / "explainctl").mkdir()
    (tmp_path / "explainctl" / "config.toml").write_text(FILE)
    return {"XDG_CONFIG_HOME": str(tmp_path)}


def test_each_layer_overrides_the_one_below(home):
    assert Settings.load(env={"XDG_CONFIG_HOME": "/nonexistent"}).queue == "explain"  # default
    from_file = Settings.load(env=home)
    assert (from_file.queue, from_file.slots, from_file.allow_http) == ("from-file", 2, True)
    assert from_file.preload == ("resnet18", "vgg19")
    assert from_file.device == "auto"  # not in the file: the default
    from_env = Settings.load(env={**home, "EXPLAINCTL_QUEUE": "from-env"})
    assert (from_env.queue, from_env.slots) == ("from-env", 2)
    from_flag = Settings.load(env={**home, "EXPLAINCTL_QUEUE": "from-env"}, queue="from-flag")
    assert from_flag.queue == "from-flag"


def test_a_profile_overrides_the_files_top_level_and_loses_to_the_environment(home):
    chosen = Settings.load(env=home, profile="gpu")
    assert (chosen.queue, chosen.device, chosen.slots) == ("gpu", "cuda", 2)
    by_variable = Settings.load(env={**home, "EXPLAINCTL_PROFILE": "gpu"})
    assert by_variable.queue == "gpu"
    assert Settings.load(env={**home, "EXPLAINCTL_PROFILE": "gpu"}, profile=None).device == "cuda"
    env_wins = Settings.load(env={**home, "EXPLAINCTL_DEVICE": "cpu"}, profile="gpu")
    assert env_wins.device == "cpu"
    with pytest.raises(InvalidInput, match=r"no profile 'cpu' \(profiles: gpu\)"):
        Settings.load(env=home, profile="cpu")


def test_another_file_by_variable_or_argument(tmp_path, home):
    other = tmp_path / "other.toml"
    other.write_text('queue = "other"\n')
    assert Settings.load(env={**home, "EXPLAINCTL_CONFIG": str(other)}).queue == "other"
    assert Settings.load(env=home, config=str(other)).queue == "other"
    with pytest.raises(InvalidInput, match="missing.toml: not found"):
        Settings.load(env=home, config=str(tmp_path / "missing.toml"))
    with pytest.raises(InvalidInput, match="profile 'gpu' asked for"):
        Settings.load(env={"XDG_CONFIG_HOME": str(tmp_path / "none")}, profile="gpu")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('broker = "redis://x"\n', "'broker' is not a setting"),
        ("[profiles.a]\nqeue = 'x'\n", "[profiles.a]: 'qeue' is not a setting"),
        ('slots = "many"\n', "slots = 'many' is not valid (an integer)"),
        ("slots = true\n", "slots = True is not valid (an integer)"),
        ('allow_http = "yes"\n', "allow_http = 'yes' is not valid (true or false)"),
        ("preload = [1, 2]\n", "preload = [1, 2] is not valid (a list of strings)"),
        ("queue = 'bad name'\n", "bad queue name"),
        ("queue = 'a\n", "not valid TOML"),
        ("profiles = 3\n", "[profiles.NAME] tables"),
    ],
)
def test_a_bad_file_is_a_one_line_error_naming_it(tmp_path, text, fragment):
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(InvalidInput) as raised:
        Settings.load(env={"EXPLAINCTL_CONFIG": str(path)})
    message = str(raised.value)
    assert fragment in message and len(message.splitlines()) == 1
    if "bad queue" not in fragment:  # checked after loading, as for the environment
        assert str(path) in message


def test_text_values_read_as_their_variable_would(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('preload = "a,b"\nallowed_roots = "/x:/y"\nslots = "3"\n')
    settings = Settings.load(env={"EXPLAINCTL_CONFIG": str(path)})
    assert (settings.preload, settings.allowed_roots) == (("a", "b"), ("/x", "/y"))
    assert settings.slots == 3


def test_the_readmes_example_file_loads_as_it_says(tmp_path):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    example = re.search(r"```toml\n(# ~/.config/explainctl/config.toml\n.*?)```", readme, re.S)
    path = tmp_path / "config.toml"
    path.write_text(example.group(1))
    gpu = Settings.load(env={"EXPLAINCTL_CONFIG": str(path)}, profile="gpu")
    assert (gpu.queue, gpu.allowed_models) == ("gpu-a100", ("resnet50", "vgg19"))
    assert gpu.broker_url.startswith("redis://:") and gpu.output == "s3://audits/explainctl"
    laptop = Settings.load(env={"EXPLAINCTL_CONFIG": str(path)}, profile="laptop")
    assert (laptop.broker_url, laptop.output) == ("", "")
    overridden = Settings.load(env={"EXPLAINCTL_CONFIG": str(path), "EXPLAINCTL_QUEUE": "other"},
                               profile="gpu")  # fmt: skip
    assert overridden.queue == "other"
