"""A real IMAP server for the tests: Debian's Dovecot, started on free high ports with a
throwaway configuration, so it never touches (or clashes with) a system Dovecot.

passwd-file authentication, Maildir storage, base_dir and state_dir all in one temporary
folder. Port `port` speaks plain IMAP and offers STARTTLS, `ssl_port` is implicit TLS; the
certificate is self-signed for 127.0.0.1/localhost and is its own CA file (`ca_file`).

Run as root, the mail processes run as Dovecot's own `dovecot` user (Dovecot refuses root
for them) and the login processes as `dovenull`; run as anybody else, everything runs as
that user (Dovecot's rootless mode). That is why the folder comes from `tempfile.mkdtemp`
and is opened to others (0755) rather than from pytest's tmp_path, whose parents are 0700.
"""

from __future__ import annotations

import datetime as dt
import imaplib
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.connectors.local_tls import free_port, make_certificate

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
PASSWORD = "imap-S3cret"
ACCOUNTS = 64  # written at start; more are added (with a pause) if a session needs them

CONFIG = """\
# Throwaway Dovecot for the Relance tests.
base_dir = {root}/run
state_dir = {root}/state
instance_name = relance-test-{port}
protocols = imap
listen = 127.0.0.1
log_path = {root}/dovecot.log
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
disable_plaintext_auth = no
auth_mechanisms = plain login
# The wrong-password tests must not slow the next ones down: no failure delay, no penalty.
auth_failure_delay = 0
default_internal_user = {internal}
default_internal_group = {internal_group}
default_login_user = {login}
first_valid_uid = 1
mail_location = maildir:{root}/mail/%u
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {root}/users
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {ssl_port}
  }}
}}
service anvil {{
  chroot =
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""


@dataclass
class Dovecot:
    root: Path
    port: int
    ssl_port: int
    ca_file: Path
    uid: int
    gid: int
    process: subprocess.Popen | None = None
    accounts: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    _next: int = 0

    # ------------------------------------------------------------------ accounts
    def add_accounts(self, count: int) -> None:
        """Write `count` more accounts to the passwd-file (user:password:uid:gid:gecos:home)."""
        fresh = [f"sdr-{uuid.uuid4().hex[:10]}@acme.example" for _ in range(count)]
        with (self.root / "users").open("a") as users:
            for login in fresh:
                users.write(f"{login}:{{PLAIN}}{PASSWORD}:{self.uid}:{self.gid}::{self.root}/mail/{login}\n")
        self.accounts.extend(fresh)

    def new_account(self) -> str:
        """An unused mailbox (its own Maildir), so every test starts from an empty inbox.

        Accounts are written ahead, at start: Dovecot notices a changed passwd-file by its
        mtime, in whole seconds, so an account added a moment after a login may stay unknown."""
        if self._next >= len(self.accounts):
            self.add_accounts(ACCOUNTS)
            time.sleep(1.1)
        self._next += 1
        return self.accounts[self._next - 1]

    def settings(self, login: str, *, security: str = "none", folder: str = "INBOX") -> dict:
        """A MailServer mapping (config.yaml's `imap:`) pointing here; the password comes
        from the environment variable RELANCE_TEST_IMAP_PASSWORD."""
        return {
            "host": self.host, "port": self.ssl_port if security == "ssl" else self.port, "security": security,
            "username": login, "password_env": "RELANCE_TEST_IMAP_PASSWORD", "folder": folder, "timeout_seconds": 5,
        }

    def tls_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    # ------------------------------------------------------------------ feeding
    def client(self, login: str) -> imaplib.IMAP4:
        conn = imaplib.IMAP4(self.host, self.port, timeout=10)
        conn.login(login, PASSWORD)
        return conn

    def append(self, login: str, messages: list[bytes], folder: str = "INBOX", when: dt.datetime | None = None) -> list[int]:
        """IMAP APPEND each message (arrival time `when`, else now); returns their UIDs (UIDPLUS)."""
        conn = self.client(login)
        try:
            if folder.upper() != "INBOX":
                conn.create(_quote(folder))  # NO when it exists: fine
            uids = []
            for raw in messages:
                raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
                typ, data = conn.append(_quote(folder), None, when, raw)
                assert typ == "OK", data
                uids.append(int(data[-1].split(b"APPENDUID", 1)[1].split()[1].rstrip(b"]")))
            return uids
        finally:
            conn.logout()

    def recreate(self, login: str, folder: str) -> None:
        """Delete and create a folder again: Dovecot gives it a new UIDVALIDITY."""
        conn = self.client(login)
        try:
            conn.delete(_quote(folder))
            typ, data = conn.create(_quote(folder))
            assert typ == "OK", data
        finally:
            conn.logout()

    def uidvalidity(self, login: str, folder: str = "INBOX") -> int:
        conn = self.client(login)
        try:
            conn.select(_quote(folder), readonly=True)
            return int(conn.response("UIDVALIDITY")[1][0])
        finally:
            conn.logout()

    def seen(self, login: str, folder: str = "INBOX") -> list[int]:
        """UIDs flagged \\Seen (the reader must leave the SDR's unread mail unread)."""
        conn = self.client(login)
        try:
            conn.select(_quote(folder), readonly=True)
            typ, data = conn.uid("SEARCH", None, "SEEN")
            return [int(n) for n in data[0].split()]
        finally:
            conn.logout()

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        with (self.root / "dovecot.out").open("ab") as out:  # a file, not a pipe nobody drains
            self.process = subprocess.Popen(
                [DOVECOT, "-F", "-c", str(self.root / "dovecot.conf")], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                out_text = (self.root / "dovecot.out").read_text(errors="replace")
                self.process = None
                raise RuntimeError(f"dovecot exited at start: {out_text}\n{self.log()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    if s.recv(200).startswith(b"* OK"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"dovecot did not answer on port {self.port}:\n{self.log()}")

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only this Dovecot's processes
            proc.wait(timeout=5)


def _quote(folder: str) -> str:
    return '"' + folder.replace("\\", "\\\\").replace('"', '\\"') + '"'


def start_dovecot() -> Dovecot:
    """Configure and start a Dovecot in a fresh temporary folder (retrying on a port race)."""
    if not Path(DOVECOT).exists():
        pytest.fail("Dovecot is not installed (apt-get install dovecot-imapd; .ci/run does it)")
    root = Path(tempfile.mkdtemp(prefix="relance-dovecot-"))
    root.chmod(0o755)
    for sub in ("run", "state", "mail"):
        (root / sub).mkdir()
    cert, key = make_certificate(root, "IMAP")
    key.chmod(0o600)
    if os.geteuid() == 0:
        internal, login = pwd.getpwnam("dovecot"), pwd.getpwnam("dovenull")
        names = {"internal": internal.pw_name, "internal_group": _group(internal.pw_gid), "login": login.pw_name}
        uid, gid = internal.pw_uid, internal.pw_gid
    else:
        me = pwd.getpwuid(os.geteuid())
        names = {"internal": me.pw_name, "internal_group": _group(me.pw_gid), "login": me.pw_name}
        uid, gid = me.pw_uid, me.pw_gid
    os.chown(root / "mail", uid, gid)
    last: Exception | None = None
    for _ in range(3):
        port, ssl_port = free_port(), free_port()
        (root / "dovecot.conf").write_text(CONFIG.format(root=root, port=port, ssl_port=ssl_port, cert=cert, key=key, **names))
        server = Dovecot(root, port, ssl_port, cert, uid, gid)
        server.add_accounts(ACCOUNTS)
        try:
            server.start()
            return server
        except RuntimeError as exc:
            last = exc
    shutil.rmtree(root, ignore_errors=True)
    raise RuntimeError(f"could not start Dovecot: {last}")


def _group(gid: int) -> str:
    import grp

    return grp.getgrgid(gid).gr_name


@pytest.fixture(scope="session")
def dovecot():
    """One Dovecot for the whole session; each test takes its own account (`new_account`)."""
    server = start_dovecot()
    yield server
    server.stop()
    shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture
def imap_password(monkeypatch):
    """Where the tests' MailServer settings read the password from."""
    monkeypatch.setenv("RELANCE_TEST_IMAP_PASSWORD", PASSWORD)
    return PASSWORD
