"""The sandbox email connector without idempotency: plain SMTP, for the crash tests and demos.

Its own module because config.yaml's `use: sandbox_plain` imports `connectors.sandbox_plain`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, ClassVar

from connectors.sandbox import _IN_CHUNK, SandboxEmail, _file_name
from relance.channels import Capability, OutboundTouch, SendResult, register

__all__ = ["SandboxPlainEmail"]


@register
class SandboxPlainEmail(SandboxEmail):
    """Plain SMTP: no idempotency key, so a second send of a touch is a second email in the
    prospect's inbox. It is what makes a blind resend after a crash visible (`<key>~2.eml`)."""

    name: ClassVar[str] = "sandbox_plain"
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.polling})

    def _send(self, touches: Sequence[OutboundTouch], now: datetime) -> list[SendResult]:
        keys = sorted({t.idempotency_key for t in touches if t.idempotency_key})
        with self._transaction() as conn:  # an SMTP server remembers nothing it accepted
            for i in range(0, len(keys), _IN_CHUNK):
                chunk = keys[i : i + _IN_CHUNK]
                conn.execute(f"DELETE FROM accepted WHERE key IN ({','.join('?' * len(chunk))})", chunk)
        return super()._send(touches, now)

    def _jsonl(self) -> None:
        return None  # nothing to recover: it remembers nothing it accepted

    def _record(self, items: list[tuple[OutboundTouch, str, Any]], now: datetime) -> None:
        if self.settings.email_record == "jsonl":  # a resend is a second line already
            return super()._record(items, now)
        folder = self.outbox / "email"
        for t, _, raw in items:
            stem = _file_name(t.idempotency_key)  # never contains "~"
            path, n = folder / f"{stem}.eml", 1
            while path.exists():
                n += 1
                path = folder / f"{stem}~{n}.eml"
            path.write_bytes(raw)
