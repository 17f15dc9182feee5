"""All configuration in one place: command-line flags over environment variables over defaults.

Every variable is listed in `Settings._ENV` and documented in the README's Configuration
table. S3 uses boto3's own configuration (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_PROFILE...).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from explainctl.errors import InvalidInput


def _split(text: str, sep: str = ",") -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(sep) if part.strip())


def _flag(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    broker_url: str = ""  # empty: the embedded Redis (explainctl.embedded)
    output: str = ""  # empty: <home>/output
    home: str = ""  # empty: ~/.local/share/explainctl
    queue: str = "explain"
    chunk_time_limit: int = 1800
    visibility_timeout: int = 2100
    max_deliveries: int = 3
    lease_seconds: int = 60
    metrics_port: int = 0
    device: str = "auto"
    slots: int = 0  # items in flight on a worker's device; 0: chosen (see worker's slot.py)
    preload: tuple[str, ...] = ()
    allowed_models: tuple[str, ...] = ()
    max_image_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 50_000_000
    allowed_roots: tuple[str, ...] = ()
    allow_http: bool = False
    http_allowed_hosts: tuple[str, ...] = field(default=())

    # name -> (environment variable, parser)
    _ENV = {
        "broker_url": ("EXPLAINCTL_BROKER_URL", str),
        "output": ("EXPLAINCTL_OUTPUT", str),
        "home": ("EXPLAINCTL_HOME", str),
        "queue": ("EXPLAINCTL_QUEUE", str),
        "chunk_time_limit": ("EXPLAINCTL_CHUNK_TIME_LIMIT", int),
        "visibility_timeout": ("EXPLAINCTL_VISIBILITY_TIMEOUT", int),
        "max_deliveries": ("EXPLAINCTL_MAX_DELIVERIES", int),
        "lease_seconds": ("EXPLAINCTL_LEASE_SECONDS", int),
        "metrics_port": ("EXPLAINCTL_METRICS_PORT", int),
        "device": ("EXPLAINCTL_DEVICE", str),
        "slots": ("EXPLAINCTL_SLOTS", int),
        "preload": ("EXPLAINCTL_PRELOAD", _split),
        "allowed_models": ("EXPLAINCTL_ALLOWED_MODELS", _split),
        "max_image_bytes": ("EXPLAINCTL_MAX_IMAGE_BYTES", int),
        "max_pixels": ("EXPLAINCTL_MAX_PIXELS", int),
        "allowed_roots": ("EXPLAINCTL_ALLOWED_ROOTS", lambda t: _split(t, os.pathsep)),
        "allow_http": ("EXPLAINCTL_ALLOW_HTTP", _flag),
        "http_allowed_hosts": ("EXPLAINCTL_HTTP_ALLOWED_HOSTS", _split),
    }

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, **flags: Any) -> Settings:
        """Settings from `env` (default os.environ), overridden by flags that are not None."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name, (variable, parse) in cls._ENV.items():
            raw = env.get(variable)
            if raw is not None and raw.strip() != "":
                try:
                    values[name] = parse(raw)
                except ValueError:
                    raise InvalidInput(f"{variable}={raw!r} is not valid") from None
        values.update({name: value for name, value in flags.items() if value is not None})
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        if min(self.chunk_time_limit, self.max_deliveries, self.lease_seconds) <= 0:
            raise InvalidInput("chunk time limit, max deliveries and lease must be positive")
        if self.slots < 0:
            raise InvalidInput(f"EXPLAINCTL_SLOTS ({self.slots}) must be 0 (auto) or more")
        # A chunk still running when the visibility timeout passes is handed to a second
        # worker while the first goes on: the timeout must outlast the longest chunk.
        if self.visibility_timeout <= self.chunk_time_limit:
            raise InvalidInput(
                f"EXPLAINCTL_VISIBILITY_TIMEOUT ({self.visibility_timeout}s) must exceed "
                f"EXPLAINCTL_CHUNK_TIME_LIMIT ({self.chunk_time_limit}s)"
            )
        if not self.queue or not all(c.isalnum() or c in "-_." for c in self.queue):
            raise InvalidInput(f"bad queue name {self.queue!r}")

    @property
    def home_dir(self) -> Path:
        from explainctl import embedded

        return Path(self.home).expanduser() if self.home else embedded.home()

    def resolve(self) -> Settings:
        """Fill in the embedded defaults: the embedded Redis (started if need be) and
        <home>/output, so one machine works with no configuration at all."""
        if self.broker_url and self.output:
            return self
        from explainctl import embedded

        broker = self.broker_url or embedded.ensure_redis(self.home_dir)
        output = self.output or str(self.home_dir / "output")
        return replace(self, broker_url=broker, output=output)

    def environment(self) -> dict[str, str]:
        """These settings as environment variables, for processes this one starts."""
        result = {}
        defaults = Settings()
        for item in fields(self):
            if item.name.startswith("_") or item.name not in self._ENV:
                continue
            value = getattr(self, item.name)
            if value == getattr(defaults, item.name):
                continue
            variable = self._ENV[item.name][0]
            if isinstance(value, tuple):
                sep = os.pathsep if item.name == "allowed_roots" else ","
                result[variable] = sep.join(value)
            elif isinstance(value, bool):
                result[variable] = "1" if value else "0"
            else:
                result[variable] = str(value)
        return result
