"""All configuration in one place: command-line flags over environment variables over the
config file over defaults.

Each setting is one field of `Settings`, declared with `setting(...)`: its default, doc
line, environment variable (EXPLAINCTL_<NAME> unless it says otherwise), CLI flag and key
in the config file (the field's name). Loading from the file and the environment, passing
settings to child processes (`environment()`), the CLI's option help and the README's
configuration table (`markdown_table`, checked by a test) all read those declarations.
Loading settings reads the file and starts nothing: the embedded Redis is started by
`explainctl.local.embedded.resolve`, explicitly. S3 uses boto3's own configuration
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_PROFILE...); only how long its calls are repeated
is set here (explainctl.io.s3.S3Settings.of).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from explainctl.spec.contracts import MAX_PIXELS
from explainctl.spec.errors import InvalidInput

# Which config file, and which of its profiles: read by Settings.load, not settings themselves.
CONFIG_VARIABLE = "EXPLAINCTL_CONFIG"
PROFILE_VARIABLE = "EXPLAINCTL_PROFILE"
# A sealed job stays listed (its index entry) this many job TTLs after its records expire.
INDEX_TTL_FACTOR = 12
# The shortest signing key accepted (`openssl rand -hex 32` gives 64).
MIN_KEY_CHARS = 16


def _flag(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def setting(
    default: Any,
    doc: str,
    *,
    flag: str | None = None,
    sep: str = ",",
    shown: str | None = None,
) -> Any:
    """One setting: `doc` is its line in the README; `flag` the CLI option that sets it
    where a command has one; `sep` splits a list; `shown` the default as people read it."""
    shown = shown if shown is not None else (str(int(default)) if isinstance(default, bool)
                                              else str(default))  # fmt: skip
    metadata = {"doc": doc, "flag": flag, "sep": sep, "shown": shown}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    broker_url: str = setting(
        "", "Redis for the queue and the job records; `redis://:password@host:6379/0`, "
        "`rediss://` for TLS", flag="--broker", shown="embedded Redis",
    )  # fmt: skip
    output: str = setting(
        "", "`s3://bucket/prefix` or a directory", flag="--output",
        shown="`$EXPLAINCTL_HOME/output`",
    )  # fmt: skip
    queue: str = setting("explain", "queue name; split GPU pools by queue", flag="--queue")
    chunk_time_limit: int = setting(1800, "hard limit (s) for one chunk on a worker")
    visibility_timeout: int = setting(
        2100, "seconds before Redis hands a lost chunk to another worker; must exceed the "
        "time limit",
    )  # fmt: skip
    job_ttl: int = setting(
        7 * 24 * 3600, "seconds a finished job's records stay in Redis once its manifest is "
        f"written (it stays listed {INDEX_TTL_FACTOR} times longer); afterwards commands read "
        "the manifest; 0: forever",
    )  # fmt: skip
    max_deliveries: int = setting(3, "attempts per item before it fails as a poison item")
    max_hand_backs: int = setting(
        8, "times workers in turn may hand an item back, their environment failing (a model "
        "they lack or refuse, storage they cannot write), before it fails with that code",
    )  # fmt: skip
    lease_seconds: int = setting(
        60, "a chunk whose worker stopped renewing its lease this long runs again"
    )
    reconcile_seconds: int = setting(
        60, "an item queued or running, yet in no message and under no lease, on two looks "
        "this far apart is sent again (workers' reapers and `wait` look)",
    )  # fmt: skip
    s3_deadline: int = setting(
        30, "seconds in a row an S3 call keeps retrying while the endpoint cannot be reached; "
        "past it a worker hands its items back for another to redo",
    )  # fmt: skip
    s3_throttle_deadline: int = setting(
        180, "seconds in all an S3 call keeps retrying while S3 throttles (503 SlowDown) or "
        "fails (5xx), backing off; at least EXPLAINCTL_S3_DEADLINE",
    )  # fmt: skip
    broker_stall_seconds: int = setting(
        300, "a worker that gets no answer from the broker this long exits non-zero, so its "
        "supervisor starts a fresh one; 0: never",
    )  # fmt: skip
    metrics_port: int = setting(
        0, "Prometheus metrics of a worker process", flag="--metrics-port", shown="off"
    )
    home: str = setting(
        "", "embedded Redis data, default output, local worker logs",
        shown="`~/.local/share/explainctl`",
    )  # fmt: skip
    device: str = setting("auto", "worker device: auto, cpu, cuda", flag="--device")
    slots: int = setting(
        0, "items in flight on a worker's device; 0: the chunk's items on a CPU, as many as "
        "free GPU memory holds (up to the chunk) on CUDA",
    )  # fmt: skip
    preload: tuple[str, ...] = setting(
        (), "models a worker loads at start, comma-separated", flag="--preload", shown=""
    )
    allowed_models: tuple[str, ...] = setting(
        (), "the model specs a worker accepts, names or fnmatch patterns (`vgg19`, `timm:*`, "
        "`hf:myorg/*`, `*` for any); unset: torchvision models with their own weights",
        shown="",
    )  # fmt: skip
    max_image_bytes: int = setting(50 * 1024 * 1024, "largest encoded image a worker reads")
    max_pixels: int = setting(MAX_PIXELS, "largest image (width × height) a worker decodes")
    allowed_roots: tuple[str, ...] = setting(
        (), "local directories workers may read inputs from (`:`-separated)",
        sep=os.pathsep, shown="any",
    )  # fmt: skip
    allowed_outputs: tuple[str, ...] = setting(
        (), "where workers may write a job's output: directories and `s3://bucket/prefix`, "
        "comma-separated", shown="any",
    )  # fmt: skip
    allowed_weights: tuple[str, ...] = setting(
        (), "weights files (`--weights`) a worker loads, comma-separated path patterns "
        "(fnmatch: `/models/*.pt`) matched against the file's real path", shown="none",
    )  # fmt: skip
    signing_keys: tuple[str, ...] = setting(
        (), "shared secrets that sign chunk messages and the job records they are built from "
        "(HMAC-SHA256), comma-separated: the first signs, every one verifies (rotation); "
        "workers holding one refuse what they do not verify", shown="",
    )  # fmt: skip
    signing_key_file: str = setting(
        "", "a file of signing keys, one a line, the first signing (read after "
        "EXPLAINCTL_SIGNING_KEYS); the embedded mode makes `$EXPLAINCTL_HOME/signing.key`",
        shown="",
    )  # fmt: skip
    allow_http: bool = setting(
        False, "1 lets workers fetch `http(s)://` inputs, public addresses only"
    )
    http_deadline: int = setting(
        60, "seconds one http(s) input may take to fetch in all (a slow drip is cut off)"
    )
    http_allowed_hosts: tuple[str, ...] = setting(
        (), "the only hosts http(s) inputs may come from, comma-separated", shown="any"
    )

    @staticmethod
    def variable(name: str) -> str:
        """The environment variable of setting `name`."""
        return "EXPLAINCTL_" + name.upper()

    @classmethod
    def load(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        config: str | None = None,
        profile: str | None = None,
        **flags: Any,
    ) -> Settings:
        """Settings from the config file (`config_path`), its `profile` if one is chosen
        (argument, else PROFILE_VARIABLE), then `env` (default os.environ), then flags
        that are not None: each layer overrides the ones before it."""
        env = os.environ if env is None else env
        values = read_config(config_path(env, config), profile or env.get(PROFILE_VARIABLE))
        for item in fields(cls):
            variable = cls.variable(item.name)
            raw = env.get(variable)
            if raw is not None and raw.strip() != "":
                try:
                    values[item.name] = _parser(item)(raw)
                except ValueError:
                    raise InvalidInput(f"{variable}={raw!r} is not valid") from None
        unknown = set(flags) - {item.name for item in fields(cls)}
        if unknown:
            raise TypeError(f"not settings: {', '.join(sorted(unknown))}")
        values.update({name: value for name, value in flags.items() if value is not None})
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        if min(self.chunk_time_limit, self.max_deliveries, self.lease_seconds,
               self.reconcile_seconds) <= 0:  # fmt: skip
            raise InvalidInput(
                "chunk time limit, max deliveries, lease and reconcile seconds must be positive"
            )
        if self.job_ttl < 0:
            raise InvalidInput("EXPLAINCTL_JOB_TTL must be 0 (forever) or more seconds")
        if self.broker_stall_seconds < 0:
            raise InvalidInput("EXPLAINCTL_BROKER_STALL_SECONDS must be 0 (never) or more")
        if self.max_hand_backs < 0:
            raise InvalidInput("EXPLAINCTL_MAX_HAND_BACKS must be 0 (fail at once) or more")
        if self.s3_deadline <= 0 or self.s3_throttle_deadline < self.s3_deadline:
            raise InvalidInput(
                f"EXPLAINCTL_S3_DEADLINE ({self.s3_deadline}s) must be positive and "
                f"EXPLAINCTL_S3_THROTTLE_DEADLINE ({self.s3_throttle_deadline}s) at least as long"
            )
        if self.slots < 0:
            raise InvalidInput(f"EXPLAINCTL_SLOTS ({self.slots}) must be 0 (auto) or more")
        # A chunk still running when the visibility timeout passes is handed to a second
        # worker while the first goes on: the timeout must outlast the longest chunk.
        if self.visibility_timeout <= self.chunk_time_limit:
            raise InvalidInput(
                f"EXPLAINCTL_VISIBILITY_TIMEOUT ({self.visibility_timeout}s) must exceed "
                f"EXPLAINCTL_CHUNK_TIME_LIMIT ({self.chunk_time_limit}s)"
            )
        self.signing_secrets()  # a key file that cannot be read is found at start
        if not self.queue or not all(c.isalnum() or c in "-_." for c in self.queue):
            raise InvalidInput(f"bad queue name {self.queue!r}")

    def signing_secrets(self) -> tuple[bytes, ...]:
        """The signing keys, the one that signs first: EXPLAINCTL_SIGNING_KEYS, then the
        lines of EXPLAINCTL_SIGNING_KEY_FILE."""
        keys = list(self.signing_keys)
        if self.signing_key_file:
            try:
                text = Path(self.signing_key_file).expanduser().read_text()
            except (OSError, UnicodeDecodeError) as error:
                raise InvalidInput(
                    f"EXPLAINCTL_SIGNING_KEY_FILE: cannot read {self.signing_key_file}: "
                    f"{getattr(error, 'strerror', None) or error}"
                ) from None
            keys += [line.strip() for line in text.splitlines() if line.strip()]
        # A short key is guessable offline from one signed message.
        if any(len(key) < MIN_KEY_CHARS for key in keys):
            raise InvalidInput(f"signing keys must be at least {MIN_KEY_CHARS} characters")
        return tuple(key.encode() for key in keys)

    @property
    def home_dir(self) -> Path:
        if self.home:
            return Path(self.home).expanduser()
        base = os.environ.get("XDG_DATA_HOME") or os.path.join(
            os.path.expanduser("~"), ".local", "share"
        )
        return Path(base) / "explainctl"

    def environment(self) -> dict[str, str]:
        """Every setting as an environment variable, for processes this one starts, so a
        child sees exactly these settings whatever its parent's environment held."""
        result = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, tuple):
                text = item.metadata["sep"].join(value)
            elif isinstance(value, bool):
                text = "1" if value else "0"
            else:
                text = str(value)
            result[self.variable(item.name)] = text
        return result


def _parser(item) -> Callable[[str], Any]:
    kind = type(item.default)
    if kind is tuple:
        sep = item.metadata["sep"]
        return lambda text: tuple(part.strip() for part in text.split(sep) if part.strip())
    if kind is bool:
        return _flag
    return kind


def config_path(env: Mapping[str, str], given: str | None = None) -> tuple[Path, bool]:
    """The config file and whether someone named it (--config, EXPLAINCTL_CONFIG): a named
    file must exist; the default one, $XDG_CONFIG_HOME/explainctl/config.toml, may not."""
    named = given or env.get(CONFIG_VARIABLE)
    if named:
        return Path(named).expanduser(), True
    base = env.get("XDG_CONFIG_HOME") or os.path.join(
        env.get("HOME") or os.path.expanduser("~"), ".config"
    )
    return Path(base) / "explainctl" / "config.toml", False


def read_config(where: tuple[Path, bool], profile: str | None = None) -> dict[str, Any]:
    """The settings a config file gives: its top-level keys, then those of
    `[profiles.PROFILE]` over them. Keys are Settings' field names."""
    path, named = where
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        if named:
            raise InvalidInput(f"config file {path}: not found") from None
        if profile:
            raise InvalidInput(f"profile {profile!r} asked for, but there is no {path}") from None
        return {}
    except OSError as error:
        raise InvalidInput(f"config file {path}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise InvalidInput(f"config file {path}: not valid TOML: {error}") from None
    profiles = document.pop("profiles", {})
    if not isinstance(profiles, dict) or not all(isinstance(p, dict) for p in profiles.values()):
        raise InvalidInput(f"config file {path}: `profiles` must hold [profiles.NAME] tables")
    values = _config_values(document, f"config file {path}")
    # Every profile is checked, chosen or not: a typo shows the day the file is written.
    tables = {
        name: _config_values(table, f"config file {path} [profiles.{name}]")
        for name, table in profiles.items()
    }
    if profile:
        if profile not in tables:
            known = ", ".join(sorted(tables)) or "none"
            raise InvalidInput(f"config file {path}: no profile {profile!r} (profiles: {known})")
        values.update(tables[profile])
    return values


def _config_values(table: dict[str, Any], where: str) -> dict[str, Any]:
    items = {item.name: item for item in fields(Settings)}
    values = {}
    for key, value in table.items():
        if key not in items:
            raise InvalidInput(f"{where}: {key!r} is not a setting (see the README's table)")
        values[key] = _config_value(items[key], value, where)
    return values


def _config_value(item, value: Any, where: str) -> Any:
    """A TOML value as the setting's type: a list setting takes an array or the text its
    variable would hold; an integer is no boolean; text is parsed as in the environment."""
    kind = type(item.default)
    if kind is tuple and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    if isinstance(value, str) and kind is not bool:
        try:
            return _parser(item)(value)
        except ValueError:
            pass
    elif isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    wanted = {tuple: "a list of strings", bool: "true or false", int: "an integer"}
    raise InvalidInput(
        f"{where}: {item.name} = {value!r} is not valid ({wanted.get(kind, 'a string')})"
    )


def describe(name: str) -> str:
    """A setting's CLI help: its doc line and variable."""
    item = next(item for item in fields(Settings) if item.name == name)
    return f"{item.metadata['doc']} [env {Settings.variable(name)}]"


def markdown_table() -> str:
    """The README's configuration table."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for item in fields(Settings):
        flag = f" (`{item.metadata['flag']}`)" if item.metadata["flag"] else ""
        rows.append(
            f"| `{Settings.variable(item.name)}`{flag} | {item.metadata['shown']} "
            f"| {item.metadata['doc']} |"
        )
    return "\n".join(rows)
