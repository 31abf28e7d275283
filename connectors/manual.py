"""Manual connectors: a person makes the call or the LinkedIn move, from a task in their queue.

They declare Capability.manual, and the engine creates a task instead of calling send_batch;
the outcome comes back when the SDR records it on the task, not from a provider.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from relance.channels import BaseConnector, Capability, OutboundTouch, SendResult, register
from relance.errors import TerminalError
from relance.events import Channel

__all__ = ["ManualCall", "ManualLinkedIn", "ManualSettings"]


class ManualSettings(BaseModel):
    """Nothing to configure; extra keys are refused so a typo in config.yaml is caught."""

    model_config = ConfigDict(extra="forbid")


class _Manual(BaseConnector):
    name: ClassVar[str] = "manual"
    settings_model: ClassVar[type[BaseModel]] = ManualSettings
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.manual})

    def send_batch(self, touches: Sequence[OutboundTouch], now: datetime) -> list[SendResult]:
        """Reaching this is an engine bug: fail loudly rather than mark a touch as sent."""
        raise TerminalError("manual connector: the engine creates tasks")


@register
class ManualLinkedIn(_Manual):
    channel: ClassVar[Channel] = Channel.linkedin


@register
class ManualCall(_Manual):
    channel: ClassVar[Channel] = Channel.call
