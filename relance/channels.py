"""The channel protocols connectors implement, and the registry that finds them by name.

A connector declares what it is as data (name, channel, settings model, capabilities), in
the manner of apprise's plugins and dlt's destinations; the core loads it by the name
written in config.yaml (`connectors.email.use: sandbox` imports `connectors.sandbox`).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel

from relance.errors import ConfigError, RelanceError
from relance.events import Channel, EventKind


class Capability(StrEnum):
    idempotent_send = "idempotent_send"  # the provider dedupes on our idempotency key
    webhooks = "webhooks"  # responses arrive through parse_webhook
    polling = "polling"  # responses are fetched with poll
    manual = "manual"  # a person does the touch: the engine creates a task instead of sending


@dataclass(frozen=True, slots=True)
class Sender:
    """The identity a touch goes out from (a mailbox, a LinkedIn seat, a dialer line)."""

    address: str
    name: str = ""
    signature: str = ""


@dataclass(slots=True)
class OutboundTouch:
    """One rendered touch, ready for a provider."""

    touch_id: int
    idempotency_key: str
    channel: Channel
    action: str  # send, visit, invite, message, call
    recipient: str  # email address, LinkedIn URL or E.164 phone
    recipient_name: str
    sender: Sender
    subject: str | None = None
    body: str = ""
    message_id: str | None = None  # RFC 5322 Message-ID we assign to an email
    in_reply_to: str | None = None
    references: tuple[str, ...] = ()
    unsubscribe_url: str | None = None
    unsubscribe_mailto: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class SendResult:
    """What happened to one touch. `error` set means it was not sent."""

    touch_id: int
    provider_message_id: str | None = None
    error: RelanceError | None = None


@dataclass(frozen=True, slots=True)
class InboundEvent:
    """A response from a provider, normalised. `dedupe_key` makes re-ingesting harmless."""

    kind: EventKind
    channel: Channel
    occurred_at: datetime
    dedupe_key: str
    touch_id: int | None = None
    idempotency_key: str | None = None
    provider_message_id: str | None = None
    message_id: str | None = None  # an RFC Message-ID our email carried (In-Reply-To of a reply)
    recipient: str | None = None  # the address or handle the event is about
    detail: str | None = None  # hard/soft, a call outcome, a return date
    payload: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class Connector(Protocol):
    name: ClassVar[str]
    channel: ClassVar[Channel]
    settings_model: ClassVar[type[BaseModel]]
    capabilities: ClassVar[frozenset[Capability]]

    def send_batch(self, touches: Sequence[OutboundTouch], now: datetime) -> list[SendResult]:
        """Send every touch; one result per touch, in any order. Raise only for a whole-batch failure."""

    def poll(self, now: datetime) -> Iterable[InboundEvent]:
        """Responses that arrived since the last poll (connectors with Capability.polling)."""

    def parse_webhook(self, headers: Mapping[str, str], body: bytes) -> list[InboundEvent]:
        """Verify and normalise one webhook call; raise TerminalError if forged or malformed."""

    def close(self) -> None:
        """Release connections."""


class BaseConnector:
    """Defaults for the optional parts of the protocol."""

    name: ClassVar[str]
    channel: ClassVar[Channel]
    settings_model: ClassVar[type[BaseModel]] = BaseModel
    capabilities: ClassVar[frozenset[Capability]] = frozenset()
    # The most touches one send_batch call gets (None: a batch's whole share of the channel).
    # A provider that takes one message at a time sets it, so that each call ends well inside
    # a lease and its outcomes are recorded before the next one.
    max_batch: ClassVar[int | None] = None

    def __init__(self, settings: BaseModel, *, workspace: Any = None):
        self.settings = settings
        self.workspace = workspace

    def poll(self, now: datetime) -> Iterable[InboundEvent]:
        return ()

    def parse_webhook(self, headers: Mapping[str, str], body: bytes) -> list[InboundEvent]:
        from relance.errors import TerminalError

        raise TerminalError(f"connector {self.name!r} does not take webhooks")

    def close(self) -> None:
        return None


_REGISTRY: dict[tuple[str, Channel], type] = {}


def register(cls: type) -> type:
    """Class decorator: make a connector findable by (name, channel)."""
    _REGISTRY[(cls.name, Channel(cls.channel))] = cls
    return cls


def registered() -> dict[tuple[str, Channel], type]:
    return dict(_REGISTRY)


def connector_class(name: str, channel: Channel) -> type:
    """Import `connectors.<name>` (or a dotted module path) and return its class for `channel`."""
    if (name, channel) not in _REGISTRY:
        module = name if "." in name else f"connectors.{name}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            raise ConfigError(f"no connector module {module!r} ({exc})", key=f"connectors.{channel.value}.use") from None
    try:
        return _REGISTRY[(name.rsplit(".", 1)[-1], channel)]
    except KeyError:
        known = sorted(n for n, c in _REGISTRY if c == channel)
        raise ConfigError(
            f"connector {name!r} has no {channel.value} channel (known: {', '.join(known) or 'none'})",
            key=f"connectors.{channel.value}.use",
        ) from None


def load_connector(name: str, channel: Channel, settings: Mapping[str, Any], *, workspace: Any = None) -> Connector:
    cls = connector_class(name, channel)
    try:
        parsed = cls.settings_model.model_validate(dict(settings))
    except Exception as exc:  # pydantic.ValidationError, named for the user
        raise ConfigError(str(exc), key=f"connectors.{channel.value}.settings") from None
    return cls(parsed, workspace=workspace)
