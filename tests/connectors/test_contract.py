"""What every connector owes the engine, run over every registered connector (apprise-style).

A new module under connectors/ is picked up automatically: it is imported below and its
classes are found through relance.channels.registered(). A connector whose defaults cannot
send (it needs a host, a key) may declare `example_settings: ClassVar[dict]` pointing at a
local test server; the table uses it instead of the defaults.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest
from pydantic import BaseModel

import connectors
from relance.channels import (
    Capability,
    Connector,
    InboundEvent,
    OutboundTouch,
    SendResult,
    Sender,
    connector_class,
    registered,
)
from relance.email_message import make_message_id
from relance.errors import TerminalError
from relance.events import Channel
from tests.connectors.brevo_server import brevo_example  # noqa: F401 - the local Brevo, a fixture

for _module in pkgutil.iter_modules(connectors.__path__):
    importlib.import_module(f"connectors.{_module.name}")

# Only the project's connectors: a test double registered by another test module is not one.
CONNECTORS = sorted(
    ((key, cls) for key, cls in registered().items() if cls.__module__.startswith("connectors.")),
    key=lambda item: (item[0][0], item[0][1].value),
)
IDS = [f"{name}-{channel.value}" for (name, channel), _ in CONNECTORS]
NOW = datetime(2026, 3, 3, 9, 45, tzinfo=timezone.utc)
SENDER = Sender("lea.martin@acme-finance.example", "Léa Martin", "Léa Martin\nAcme Finance")
PROSPECTS = [
    ("Zoé Bouchard", "zoe.bouchard@sge-equipement.example", "https://www.linkedin.com/in/zoe-bouchard", "+33612345678"),
    ("François Lefèvre", "f.lefevre@brasserie-faubourg.example", "https://www.linkedin.com/in/francois-lefevre", "+33698765432"),
    ("Hélène Moreau-Château", "helene@keranna.example", "https://www.linkedin.com/in/helene-moreau-chateau", "+33145678901"),
]
ACTION = {Channel.email: "send", Channel.linkedin: "invite", Channel.call: "call", Channel.task: "task"}
GARBAGE = [b"", b"\x00\xff\xfe garbage", b"not json at all", b"{}", b"[]", b'{"events": [{"kind": 42}]}', b"<xml/>" * 100]
HEADERS = [{}, {"X-Sandbox-Signature": "deadbeef", "Content-Type": "application/json"}, {"X-Signature": "sha256=00"}]

pytestmark = pytest.mark.skipif(not CONNECTORS, reason="no connector registered")


def touches_for(channel: Channel) -> list[OutboundTouch]:
    out = []
    for i, (name, email, linkedin, phone) in enumerate(PROSPECTS):
        key = f"contract-{channel.value}-{i}"
        recipient = {Channel.email: email, Channel.linkedin: linkedin, Channel.call: phone}.get(channel, email)
        out.append(
            OutboundTouch(
                touch_id=900 + i,
                idempotency_key=key,
                channel=channel,
                action=ACTION[channel],
                recipient=recipient,
                recipient_name=name,
                sender=SENDER,
                subject=f"{name.split()[0]}, une question rapide" if channel == Channel.email else None,
                body=f"Bonjour {name.split()[0]},\n\nÇa vous dirait d'échanger 15 minutes ?\n\nLéa",
                message_id=make_message_id(SENDER.address, key) if channel == Channel.email else None,
                unsubscribe_url="https://acme-finance.example/u/tok.sig" if channel == Channel.email else None,
            )
        )
    return out


@pytest.fixture(params=[cls for _, cls in CONNECTORS], ids=IDS)
def connector_cls(request) -> type:
    return request.param


# Connectors whose example_settings point at a local server that a fixture starts: name -> fixture.
LOCAL_SERVERS = {"brevo": "brevo_example", "smtp": "smtp_example_settings"}  # smtp: tests/connectors/conftest.py


@pytest.fixture
def connector(connector_cls, tmp_path, request):
    example = getattr(connector_cls, "example_settings", {})
    if connector_cls.name in LOCAL_SERVERS:
        example = request.getfixturevalue(LOCAL_SERVERS[connector_cls.name])
    settings = connector_cls.settings_model.model_validate(example)
    instance = connector_cls(settings, workspace=SimpleNamespace(root=tmp_path))
    yield instance
    instance.close()


def test_declares_what_it_is_as_data(connector_cls):
    assert isinstance(connector_cls.name, str) and connector_cls.name.isidentifier()
    assert isinstance(connector_cls.channel, Channel)
    assert isinstance(connector_cls.settings_model, type) and issubclass(connector_cls.settings_model, BaseModel)
    assert isinstance(connector_cls.capabilities, frozenset)
    assert connector_cls.capabilities and all(isinstance(c, Capability) for c in connector_cls.capabilities)
    if Capability.manual in connector_cls.capabilities:
        assert connector_cls.capabilities == {Capability.manual}, "a manual connector sends nothing, polls nothing"


def test_is_found_by_the_name_config_yaml_uses(connector_cls):
    assert connector_cls.__module__ == f"connectors.{connector_cls.name}"
    assert connector_class(connector_cls.name, connector_cls.channel) is connector_cls


def test_settings_model_validates_its_defaults(connector_cls):
    model = connector_cls.settings_model
    defaults = {
        name: field.get_default(call_default_factory=True)
        for name, field in model.model_fields.items()
        if not field.is_required()
    }
    parsed = model.model_validate(defaults)  # defaults go through the validators, not around them
    assert model.model_validate(parsed.model_dump()) == parsed
    if not any(f.is_required() for f in model.model_fields.values()):
        assert model() == parsed


def test_settings_model_refuses_unknown_keys(connector_cls):
    with pytest.raises(ValueError):
        connector_cls.settings_model.model_validate({"definitely_not_a_setting": 1})


def test_is_a_connector(connector):
    assert isinstance(connector, Connector)


def test_sends_a_batch_with_one_result_per_touch(connector):
    touches = touches_for(connector.channel)
    if Capability.manual in connector.capabilities:
        with pytest.raises(TerminalError):  # the engine creates tasks; sending is a bug, loudly
            connector.send_batch(touches, NOW)
        return
    results = connector.send_batch(touches, NOW)
    assert isinstance(results, list) and all(isinstance(r, SendResult) for r in results)
    assert sorted(r.touch_id for r in results) == sorted(t.touch_id for t in touches)
    for r in results:
        assert r.error is None, f"touch {r.touch_id}: {r.error}"
    if Capability.idempotent_send in connector.capabilities:
        again = {r.touch_id: r.provider_message_id for r in connector.send_batch(touches, NOW)}
        assert again == {r.touch_id: r.provider_message_id for r in results}


def test_poll_returns_inbound_events(connector):
    if Capability.manual not in connector.capabilities:
        connector.send_batch(touches_for(connector.channel), NOW)
    events = connector.poll(datetime(2026, 6, 1, tzinfo=timezone.utc))
    assert isinstance(events, Iterable)
    events = list(events)
    assert all(isinstance(e, InboundEvent) for e in events)
    assert all(e.channel == connector.channel and e.occurred_at.tzinfo is not None for e in events)
    assert len({e.dedupe_key for e in events}) == len(events)
    if Capability.polling not in connector.capabilities:
        assert events == []


@pytest.mark.parametrize("body", GARBAGE, ids=range(len(GARBAGE)))
@pytest.mark.parametrize("headers", HEADERS, ids=["none", "fake-signature", "other-header"])
def test_webhook_garbage_is_a_terminal_error_never_another_exception(connector, headers, body):
    with pytest.raises(TerminalError):
        connector.parse_webhook(headers, body)
