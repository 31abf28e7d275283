"""Passwords for mail servers: from an environment variable or a Prefect Secret block,
never from config.yaml."""

from __future__ import annotations

import os

from relance.config import MailServer
from relance.errors import ConfigError


def server_password(server: MailServer, key: str) -> str | None:
    """The password `server` names, or None when it needs none. `key` locates the setting."""
    if server.password_env:
        value = os.environ.get(server.password_env)
        if value is None:
            raise ConfigError(f"environment variable {server.password_env} is not set", key=f"{key}.password_env")
        return value
    if server.password_secret:
        from prefect.blocks.system import Secret  # only when a Secret block is named

        try:
            return Secret.load(server.password_secret).get()
        except ValueError as exc:
            raise ConfigError(f"Prefect Secret block {server.password_secret!r}: {exc}", key=f"{key}.password_secret") from None
    return None
