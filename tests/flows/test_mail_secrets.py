"""Mail server passwords from a Prefect Secret block, against Prefect's test server."""

from __future__ import annotations

import pytest
from prefect.blocks.system import Secret

from connectors.mail_secrets import server_password
from relance.config import MailServer
from relance.errors import ConfigError


def test_a_password_comes_from_a_prefect_secret_block():
    Secret(value="imap-s3cret").save("relance-test-imap", overwrite=True)
    server = MailServer(host="imap.example", port=993, security="ssl", username="marie", password_secret="relance-test-imap")
    assert server_password(server, "senders.sales[0].imap") == "imap-s3cret"


def test_a_missing_block_or_variable_names_the_setting(monkeypatch):
    missing = MailServer(host="imap.example", port=993, username="marie", password_secret="no-such-block")
    with pytest.raises(ConfigError, match=r"senders.sales\[0\].imap.password_secret"):
        server_password(missing, "senders.sales[0].imap")
    monkeypatch.delenv("RELANCE_TEST_UNSET_PASSWORD", raising=False)
    unset = MailServer(host="smtp.example", port=587, username="marie", password_env="RELANCE_TEST_UNSET_PASSWORD")
    with pytest.raises(ConfigError, match="RELANCE_TEST_UNSET_PASSWORD is not set"):
        server_password(unset, "senders.sales[0].smtp")
    assert server_password(MailServer(host="relay.local", port=25, security="none"), "relay") is None
