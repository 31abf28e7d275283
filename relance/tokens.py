"""Signed opt-out tokens (itsdangerous): a link can be neither forged nor enumerated."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from itsdangerous import BadSignature, URLSafeSerializer

from relance.errors import TerminalError

_SALT = "relance-unsubscribe"


def workspace_secret(root: Path, env_name: str) -> str:
    """The signing secret: from the environment, else one generated once per workspace."""
    if value := os.environ.get(env_name):
        return value
    path = root / ".relance" / "secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip()


class UnsubscribeTokens:
    def __init__(self, secret: str):
        self._serializer = URLSafeSerializer(secret, salt=_SALT)

    def make(self, prospect_id: int, enrollment_id: int | None = None) -> str:
        return self._serializer.dumps([prospect_id, enrollment_id])

    def read(self, token: str) -> tuple[int, int | None]:
        try:
            prospect_id, enrollment_id = self._serializer.loads(token)
        except (BadSignature, ValueError, TypeError):
            raise TerminalError("invalid or forged unsubscribe token") from None
        if not isinstance(prospect_id, int):
            raise TerminalError("invalid unsubscribe token")
        return prospect_id, enrollment_id
