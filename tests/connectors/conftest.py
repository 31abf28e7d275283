"""Fixtures shared by the connector tests: the live SMTP servers of smtp_server.py."""

from tests.connectors.smtp_server import smtp_example_settings, smtp_server, smtp_tls_server  # noqa: F401
# The live IMAP server of dovecot.py (one Dovecot per session, an account per test).
from tests.connectors.dovecot import dovecot, imap_password  # noqa: E402, F401
