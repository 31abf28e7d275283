"""The web app, served by a real uvicorn on a free local port, exercised over HTTP."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from sqlalchemy import func, select

from connectors.sandbox import sign_webhook
from relance.dispatch import Dispatcher
from relance.enrollment import enroll
from relance.store import enrollments, events, suppressions, touches
from relance.tokens import UnsubscribeTokens, workspace_secret
from relance.web import create_app
from relance.workspace import Workspace
from tests.conftest import at
from tests.relance.test_engine import MONDAY, add_prospects, person

NOW = at("2027-03-15T09:30:00")


@pytest.fixture
def served(workspace_dir: Path):
    ws = Workspace.load(workspace_dir)
    app = create_app(ws, clock=lambda: NOW)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        yield ws, client
    server.should_exit = True
    thread.join(timeout=10)
    ws.close()


def _one_sent_enrollment(ws: Workspace) -> tuple[int, int]:
    [pid] = add_prospects(ws, person(1))
    enroll(ws, ws.sequence("outbound"), [pid], MONDAY)
    Dispatcher(ws).run(NOW)
    with ws.store.connect() as conn:
        enrollment_id = conn.scalar(select(enrollments.c.id).where(enrollments.c.prospect_id == pid))
    return pid, enrollment_id


def test_health(served):
    _, client = served
    assert client.get("/health").json() == {"status": "ok"}


def test_one_click_unsubscribe_suppresses_and_ends_the_cadence_at_once(served):
    ws, client = served
    pid, enrollment_id = _one_sent_enrollment(ws)
    token = UnsubscribeTokens(workspace_secret(ws.root, ws.config.web.secret_env)).make(pid, enrollment_id)
    page = client.get(f"/u/{token}")
    assert page.status_code == 200 and "Acme Finance SAS" in page.text and "<form" in page.text
    # RFC 8058: the mail client POSTs List-Unsubscribe=One-Click, no cookie, no confirmation.
    done = client.post(f"/u/{token}", content="List-Unsubscribe=One-Click", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert done.status_code == 200
    with ws.store.connect() as conn:
        assert conn.scalar(select(enrollments.c.state).where(enrollments.c.id == enrollment_id)) == "exited"
        kinds = set(conn.scalars(select(suppressions.c.kind)))
        assert {"email", "phone", "linkedin"} <= kinds
    # Twice is harmless.
    assert client.post(f"/u/{token}").status_code == 200
    with ws.store.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(events).where(events.c.kind == "unsubscribed")) == 1


@pytest.mark.parametrize("token", ["forged", "WzEsIDFd.forged-signature", "x" * 500])
def test_a_forged_token_gets_404_and_changes_nothing(served, token):
    ws, client = served
    _one_sent_enrollment(ws)
    assert client.get(f"/u/{token}").status_code == 404
    assert client.post(f"/u/{token}").status_code == 404
    with ws.store.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(suppressions)) == 0
        assert set(conn.scalars(select(enrollments.c.state))) == {"active"}


def test_a_signed_webhook_is_ingested_and_a_forged_or_malformed_one_refused(served):
    ws, client = served
    _one_sent_enrollment(ws)
    with ws.store.connect() as conn:
        touch_id = conn.scalar(select(touches.c.id))
    body = json.dumps({"events": [{"id": "evt-1", "kind": "replied", "touch_id": touch_id, "occurred_at": NOW.isoformat()}]}).encode()
    secret = ws.config.connectors["email"].settings.get("webhook_secret", "sandbox-secret")
    signed = client.post("/webhooks/email", content=body, headers={"X-Sandbox-Signature": sign_webhook(body, secret)})
    assert signed.status_code == 200 and signed.json()["recorded"] == 1 and signed.json()["exited"] == 1
    forged = client.post("/webhooks/email", content=body.replace(b"replied", b"opened"), headers={"X-Sandbox-Signature": sign_webhook(body, secret)})
    assert forged.status_code == 401 and "does not match" in forged.json()["error"]
    assert client.post("/webhooks/email", content=body).status_code == 401  # unsigned
    assert client.post("/webhooks/email", content=b"{not json", headers={"X-Sandbox-Signature": sign_webhook(b"{not json", secret)}).status_code == 400
    assert client.post("/webhooks/fax", content=b"{}").status_code == 404
    with ws.store.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(events).where(events.c.kind == "opened")) == 0


def test_task_inbox_lists_and_closes_tasks(backend: str, tmp_path: Path):
    from tests.conftest import database_url, write_workspace

    ws = Workspace.load(write_workspace(tmp_path / "ws", database_url(backend, tmp_path), call="manual"))
    app = create_app(ws, clock=lambda: at("2027-03-20T09:00:00"))
    from fastapi.testclient import TestClient

    [pid] = add_prospects(ws, person(1))
    enroll(ws, ws.sequence("outbound"), [pid], MONDAY)
    for day in ("2027-03-15T09:30:00", "2027-03-16T09:30:00", "2027-03-17T09:30:00"):
        Dispatcher(ws).run(at(day))
    client = TestClient(app)
    page = client.get("/tasks")
    assert page.status_code == 200 and "Appeler Prénom1 Nom1" in page.text
    task_id = int(page.text.split('action="/tasks/')[1].split('"')[0])
    assert client.post(f"/tasks/{task_id}", data={"outcome": "voicemail"}, follow_redirects=False).status_code == 303
    assert client.post(f"/tasks/{task_id}", data={"outcome": "voicemail"}).status_code == 400  # already closed
    ws.close()


def test_one_click_ends_every_cadence_of_the_address_at_once_and_no_reimport_undoes_it(served, tmp_path: Path):
    """Issue 4 item 7 through the web app: the address (not the whole domain: that takes an explicit
    request) is suppressed at once, every active enrollment of the prospect ends before its next
    touch, and importing the same person again changes nothing."""
    from datetime import timedelta

    from relance.prospects import import_csv
    from relance.suppression import suppressed_ids
    from relance.store import prospects
    from tests.relance.test_engine import touch_rows

    ws, client = served
    bystanders = add_prospects(ws, person(90), person(91))  # enrollment ids run ahead of prospect ids
    enroll(ws, ws.sequence("nurture"), bystanders, MONDAY)
    enroll(ws, ws.sequence("outbound"), bystanders, MONDAY)
    pid, colleague = add_prospects(ws, person(1), person(2, email="lucie@client1.example"))
    enroll(ws, ws.sequence("outbound"), [pid, colleague], MONDAY)
    enroll(ws, ws.sequence("nurture"), [pid, colleague], MONDAY)  # not exclusive: runs alongside
    Dispatcher(ws).run(NOW)
    with ws.store.connect() as conn:
        mine = dict(conn.execute(select(enrollments.c.sequence, enrollments.c.id).where(enrollments.c.prospect_id == pid)).all())
    token = UnsubscribeTokens(workspace_secret(ws.root, ws.config.web.secret_env)).make(pid, mine["outbound"])

    assert client.post(f"/u/{token}", content="List-Unsubscribe=One-Click",
                       headers={"Content-Type": "application/x-www-form-urlencoded"}).status_code == 200
    with ws.store.connect() as conn:
        states = dict(conn.execute(select(enrollments.c.sequence, enrollments.c.state).where(enrollments.c.prospect_id == pid)).all())
        others = set(conn.scalars(select(enrollments.c.state).where(enrollments.c.prospect_id == colleague)))
        kept = {(r.kind, r.value) for r in conn.execute(select(suppressions.c.kind, suppressions.c.value))}
    assert states == {"outbound": "exited", "nurture": "exited"}  # both, before any dispatch
    assert others == {"active"}
    assert kept == {("email", "p1@client1.example"), ("phone", "+33612340001"), ("linkedin", "https://www.linkedin.com/in/p1")}

    # The same person from another export (other case, new title): still suppressed, not re-enrolled.
    csv_path = tmp_path / "again.csv"
    csv_path.write_text("email,first_name,last_name,company,title\nP1@Client1.EXAMPLE,Prénom1,Nom1,Client 1,DAF\n")
    assert import_csv(ws.store, csv_path, now=NOW + timedelta(hours=1)).updated == 1
    assert enroll(ws, ws.sequence("nurture"), [pid], NOW + timedelta(hours=1)).enrolled == 0
    with ws.store.connect() as conn:
        assert {(r.kind, r.value) for r in conn.execute(select(suppressions.c.kind, suppressions.c.value))} == kept
        row = conn.execute(select(prospects).where(prospects.c.id == pid)).one()
        assert suppressed_ids(conn, [row]) == {pid: "unsubscribed (email)"}

    before = {t.id for t in touch_rows(ws)}
    dispatcher = Dispatcher(ws)
    for day in range(1, 20):
        dispatcher.run(NOW + timedelta(days=day))
    touched = {t.prospect_id for t in touch_rows(ws) if t.id not in before and t.status not in ("skipped", "failed")}
    assert pid not in touched and colleague in touched
    # The page still answers after the fact, and a second click changes nothing.
    assert client.get(f"/u/{token}").status_code == 200
    assert client.post(f"/u/{token}").status_code == 200
    with ws.store.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(events).where(events.c.kind == "unsubscribed")) == 1


def test_the_opt_out_page_can_stop_the_whole_company_and_credits_the_cadence(served):
    ws, client = served
    pid, colleague = add_prospects(ws, person(1), person(2, email="lucie@client1.example"))
    enroll(ws, ws.sequence("outbound"), [pid, colleague], MONDAY)
    Dispatcher(ws).run(NOW)
    with ws.store.connect() as conn:
        enrollment_id = conn.scalar(select(enrollments.c.id).where(enrollments.c.prospect_id == pid))
        sender = conn.scalar(select(enrollments.c.sender).where(enrollments.c.id == enrollment_id))
    token = UnsubscribeTokens(workspace_secret(ws.root, ws.config.web.secret_env)).make(pid, enrollment_id)
    page = client.get(f"/u/{token}")
    assert 'name="scope" value="domain"' in page.text and "client1.example" in page.text
    done = client.post(f"/u/{token}", data={"List-Unsubscribe": "One-Click", "scope": "domain"})
    assert done.status_code == 200
    with ws.store.connect() as conn:
        kept = {(r.kind, r.value) for r in conn.execute(select(suppressions.c.kind, suppressions.c.value))}
        event = conn.execute(select(events.c.sequence, events.c.sender).where(events.c.kind == "unsubscribed")).one()
    assert ("domain", "client1.example") in kept
    assert (event.sequence, event.sender) == ("outbound", sender)
    # The colleague is never contacted again: the suppression ends her cadence before its next touch.
    from datetime import timedelta

    for day in range(1, 15):
        Dispatcher(ws).run(NOW + timedelta(days=day))
    with ws.store.connect() as conn:
        state = conn.execute(select(enrollments.c.state, enrollments.c.reason).where(enrollments.c.prospect_id == colleague)).one()
    assert state.state == "exited" and "(domain)" in state.reason, state


def test_a_webmail_address_is_never_offered_the_whole_domain(served):
    ws, client = served
    [pid] = add_prospects(ws, person(1, email="jean.dupont@gmail.com"))
    token = UnsubscribeTokens(workspace_secret(ws.root, ws.config.web.secret_env)).make(pid, None)
    assert "scope" not in client.get(f"/u/{token}").text
    assert client.post(f"/u/{token}", data={"scope": "domain"}).status_code == 200
    with ws.store.connect() as conn:
        assert ("domain", "gmail.com") not in {(r.kind, r.value) for r in conn.execute(select(suppressions.c.kind, suppressions.c.value))}
