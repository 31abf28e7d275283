"""Shared fixtures: a store on each backend, and small workspaces on a simulated clock.

PostgreSQL tests talk to the real server (127.0.0.1:5432 here and in CI) and FAIL when it is
unreachable: a skipped backend would hide exactly the bugs the second backend is for.
"""

from __future__ import annotations

import os
import shutil
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import MetaData, create_engine, text

from relance.store import Store

POSTGRES_URL = os.environ.get("RELANCE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REPO = Path(__file__).resolve().parent.parent
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def reset_postgres(url: str = POSTGRES_URL) -> None:
    """Drop every table (alembic_version and later migrations' included) so the next
    Store(url) migrates from scratch."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            existing = MetaData()
            existing.reflect(conn)
            existing.drop_all(conn)
    except Exception as exc:  # noqa: BLE001 - turned into a loud failure
        pytest.fail(f"PostgreSQL at {url} is unreachable or broken: {exc}")
    finally:
        engine.dispose()


@pytest.fixture
def postgres_lock():
    """Held for the whole test: test processes sharing the database take turns."""
    engine = create_engine(POSTGRES_URL)
    try:
        lock = engine.connect()
        lock.execute(text("SELECT pg_advisory_lock(72410)"))
        lock.commit()
    except Exception as exc:  # noqa: BLE001 - turned into a loud failure
        engine.dispose()
        pytest.fail(f"PostgreSQL at {POSTGRES_URL} is unreachable: {exc}")
    yield
    lock.execute(text("SELECT pg_advisory_unlock(72410)"))
    lock.close()
    engine.dispose()


def database_url(backend: str, tmp_path: Path) -> str:
    if backend == "postgres":
        reset_postgres()
        return POSTGRES_URL
    return f"sqlite:///{tmp_path / 'relance.db'}"


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    if request.param == "postgres":
        request.getfixturevalue("postgres_lock")
    return request.param


@pytest.fixture
def store(backend: str, tmp_path: Path):
    s = Store(database_url(backend, tmp_path))
    yield s
    s.dispose()


def at(text_: str) -> datetime:
    """An aware UTC datetime from ISO text: the tests' simulated clock."""
    value = datetime.fromisoformat(text_)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


CONFIG = """
database: {database}
timezone: Europe/Paris
country: FR
company: {{name: "Acme Finance SAS", address: "12 rue de la Paix, 75002 Paris"}}
senders:
  sales:
    - {{email: marie@acme.example, name: "Marie Dupont", signature: "Marie Dupont, Acme", daily_limit: {daily}}}
    - {{email: lea@acme.example, name: "Léa Martin", daily_limit: {daily}}}
connectors:
  email: {{use: sandbox, settings: {{outbox: outbox, seed: 3, rates: {rates}}}}}
  linkedin: {{use: {linkedin}, settings: {linkedin_settings}}}
  call: {{use: {call}, settings: {call_settings}}}
dispatch: {{batch_size: {batch}}}
web: {{base_url: "https://links.acme.example"}}
"""

SEQUENCE = """
name: outbound
owner: marie@acme.example
schedule:
  timezone: prospect
  window: {days: mon-fri, hours: ["09:00-12:00", "14:00-17:30"]}
  holidays: FR
  jitter_minutes: 10
sender: {pool: sales}
exit_on: [replied, meeting_booked, bounced, unsubscribed]
on_exit:
  disqualified: {enroll: nurture}
steps:
  - id: intro
    email:
      template: email/intro.j2
      variants: [{id: a, subject: "Question pour {{ prospect.company }}"}, {id: b, subject: "Votre clôture mensuelle"}]
  - id: invite
    wait: 1 business day
    linkedin: {action: invite, template: linkedin/invite.j2}
  - id: call-1
    wait: 1 business day
    call: {script: call/script.j2}
  - id: bump
    wait: 2 business days
    when: "not opened('intro')"
    email: {reply_to: intro, template: email/bump.j2}
  - id: message
    wait: 1 business day
    when: "accepted('invite')"
    linkedin: {action: message, template: linkedin/message.j2}
"""

NURTURE = """
name: nurture
kind: nurture
exclusive: false
sender: {pool: sales}
steps:
  - id: news
    wait: 2 weeks
    email: {template: email/bump.j2, subject: "Nouvelles"}
"""

TEMPLATES = {
    "email/intro.j2": "Bonjour {{ prospect.first_name }},\n\nJe vous écris au sujet de {{ prospect.company }}.\n\n{% include 'email/_footer.j2' %}\n",
    "email/bump.j2": "{{ prospect.first_name }}, un petit rappel.\n\n{% include 'email/_footer.j2' %}\n",
    "email/_footer.j2": "{{ sender.name }}\n{{ company.name }}, {{ company.address }}\nPour ne plus être contacté : {{ unsubscribe_url }}\n",
    "linkedin/invite.j2": "Bonjour {{ prospect.first_name }}, ravi d'échanger.",
    "linkedin/message.j2": "Merci pour la connexion, {{ prospect.first_name }} !",
    "call/script.j2": "Appeler {{ prospect.first_name }} {{ prospect.last_name }} ({{ prospect.company }}).\nQuestion : comment se passe la clôture ?\n",
}

QUIET_RATES = "{email.opened: 0.0, email.clicked: 0.0, email.replied: 0.0, email.auto_replied: 0.0, email.unsubscribed: 0.0, email.complained: 0.0, email.bounced_hard: 0.0, email.bounced_soft: 0.0}"


def write_workspace(
    root: Path,
    database: str,
    *,
    rates: str = QUIET_RATES,
    linkedin: str = "sandbox",
    call: str = "sandbox",
    daily: int = 500,
    batch: int = 100,
    sequences: dict[str, str] | None = None,
    templates: dict[str, str] | None = None,
) -> Path:
    """A small workspace: one multichannel cadence and a nurture, sandbox connectors."""
    root.mkdir(parents=True, exist_ok=True)
    quiet = "{outbox: outbox, seed: 3, rates: {linkedin.accepted: 0.0, linkedin.replied: 0.0, call.connected: 0.0, call.voicemail: 1.0, call.no_answer: 0.0, call.wrong_number: 0.0}}"
    (root / "config.yaml").write_text(
        CONFIG.format(
            database=database, rates=rates, linkedin=linkedin, call=call, daily=daily, batch=batch,
            linkedin_settings=quiet if linkedin == "sandbox" else "{}",
            call_settings=quiet if call == "sandbox" else "{}",
        )
    )
    for name, body in (sequences or {"outbound.yaml": SEQUENCE, "nurture.yaml": NURTURE}).items():
        (root / "sequences").mkdir(exist_ok=True)
        (root / "sequences" / name).write_text(textwrap.dedent(body))
    for name, body in {**TEMPLATES, **(templates or {})}.items():
        path = root / "templates" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
    return root


@pytest.fixture
def workspace_dir(backend: str, tmp_path: Path) -> Path:
    return write_workspace(tmp_path / "ws", database_url(backend, tmp_path))


@pytest.fixture
def example_workspace(tmp_path: Path) -> Path:
    """A copy of the repository's example workspace on a fresh SQLite database."""
    root = tmp_path / "example"
    root.mkdir()
    shutil.copy2(REPO / "config.yaml", root / "config.yaml")
    for folder in ("sequences", "templates", "prospects"):
        shutil.copytree(REPO / folder, root / folder)
    return root
