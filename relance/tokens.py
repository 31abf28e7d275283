"""Signed opt-out tokens (itsdangerous): a link can be neither forged nor enumerated."""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from itsdangerous import Signer

from relance.errors import TerminalError

_SALT = "relance-unsubscribe"
# 104 bits of HMAC: unforgeable, and too short for SpamAssassin to read a Bitcoin address in
# the link (__BITCOIN_ID wants a 1 or a 3, then 29 or more base58 characters).
SIGNATURE_HEX = 26


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
    """`<prospect>.<enrollment>.<signature>`: one HMAC per email, made on the send path for
    every email, so no JSON or compression around two integers."""

    def __init__(self, secret: str):
        self._signer = Signer(secret, salt=_SALT)
        # itsdangerous derives the HMAC key from the secret on every call, and hands hmac a
        # hash constructor (its pure-Python path): derive once, key an OpenSSL HMAC once, and
        # sign each value on a copy of it (half the cost of a one-shot HMAC, which keys anew).
        # Same signature as the Signer's.
        self._keyed = hmac.new(self._signer.derive_key(), digestmod=self._signer.digest_method().name)

    def _signature(self, value: bytes) -> str:
        mac = self._keyed.copy()
        mac.update(value)
        return mac.hexdigest()[:SIGNATURE_HEX]

    def make(self, prospect_id: int, enrollment_id: int | None = None) -> str:
        value = f"{prospect_id}.{'' if enrollment_id is None else enrollment_id}"
        return f"{value}.{self._signature(value.encode())}"

    def read(self, token: str) -> tuple[int, int | None]:
        value, _, signature = token.encode().rpartition(b".")
        expected = self._signature(value).encode()
        if not value or not hmac.compare_digest(signature, expected):
            raise TerminalError("invalid or forged unsubscribe token")
        prospect, _, enrollment = value.decode().partition(".")
        if not prospect.isdigit() or (enrollment and not enrollment.isdigit()):
            raise TerminalError("invalid unsubscribe token")
        return int(prospect), int(enrollment) if enrollment else None
