"""The embedded stack's signing key: made once, private, and handed to its workers."""

import stat

from explainctl.config import Settings
from explainctl.local import embedded


def test_the_embedded_mode_makes_a_private_key_its_workers_share(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "ensure_redis", lambda root: "redis://127.0.0.1:1/0")
    first = embedded.resolve(Settings.load(env={"EXPLAINCTL_HOME": str(tmp_path)}))
    key_file = tmp_path / embedded.SIGNING_KEY
    assert first.signing_key_file == str(key_file)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    (secret,) = first.signing_secrets()
    assert len(secret) == 64
    # A local worker started with these settings reads the same key; so does a second run.
    child = Settings.load(env=first.environment())
    again = embedded.resolve(Settings.load(env={"EXPLAINCTL_HOME": str(tmp_path)}))
    assert child.signing_secrets() == again.signing_secrets() == (secret,)


def test_configured_keys_or_a_configured_broker_are_left_as_they_are(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "ensure_redis", lambda root: "redis://127.0.0.1:1/0")
    keyed = Settings.load(env={"EXPLAINCTL_HOME": str(tmp_path),
                               "EXPLAINCTL_SIGNING_KEYS": "k" * 32})  # fmt: skip
    assert embedded.resolve(keyed).signing_key_file == ""
    brokered = Settings.load(env={"EXPLAINCTL_HOME": str(tmp_path),
                                  "EXPLAINCTL_BROKER_URL": "redis://127.0.0.1:2/0"})  # fmt: skip
    assert embedded.resolve(brokered).signing_key_file == ""
    assert not (tmp_path / embedded.SIGNING_KEY).exists()
