"""The web app: one-click opt-out (RFC 8058), provider webhooks, the SDR task inbox, health.

Imported only by `relance web` / `relance serve` and the tests: the core stays free of a web
framework at import time.
"""

from __future__ import annotations

import html
from datetime import UTC, datetime

from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from sqlalchemy import select, text

from relance.errors import TerminalError, Unauthenticated, UserInputError
from relance.events import Channel, EventKind
from relance.inbox import complete_task, open_tasks
from relance.ingest import ingest, insert_events
from relance import rules
from relance.store import enrollments, prospects
from relance.suppression import company_domain, suppress
from relance.tokens import UnsubscribeTokens, workspace_secret
from relance.workspace import Workspace

PAGE = """<!doctype html><html lang="{lang}"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: system-ui, sans-serif; max-width: 40rem; margin: 3rem auto; padding: 0 1rem">{body}</body></html>"""


def _page(title: str, body: str, status: int = 200, lang: str = "fr") -> HTMLResponse:
    return HTMLResponse(PAGE.format(lang=lang, title=html.escape(title), body=body), status_code=status)


def create_app(ws: Workspace, clock=lambda: datetime.now(UTC)) -> FastAPI:
    app = FastAPI(title="Relance", docs_url=None, redoc_url=None)
    tokens = UnsubscribeTokens(workspace_secret(ws.root, ws.config.web.secret_env))

    @app.get("/health")
    def health() -> JSONResponse:
        with ws.store.connect() as conn:
            conn.execute(text("SELECT 1"))
        return JSONResponse({"status": "ok"})

    def _unsubscribe(token: str, whole_domain: bool = False) -> tuple[int, int | None] | None:
        try:
            prospect_id, enrollment_id = tokens.read(token)
        except TerminalError:
            return None
        now = clock()
        with ws.store.begin() as conn:
            email = conn.scalar(select(prospects.c.email).where(prospects.c.id == prospect_id))
            if email is None and conn.scalar(select(prospects.c.id).where(prospects.c.id == prospect_id)) is None:
                return None
            # Credited to the cadence and mailbox the link came from, for the deliverability view.
            origin = conn.execute(
                select(enrollments.c.sequence, enrollments.c.sender).where(
                    enrollments.c.id == enrollment_id, enrollments.c.prospect_id == prospect_id
                )
            ).first()
            row = {
                "occurred_at": now, "recorded_at": now, "kind": EventKind.unsubscribed.value, "channel": Channel.email.value,
                "detail": "one-click", "prospect_id": prospect_id, "enrollment_id": enrollment_id if origin else None,
                "touch_id": None, "sequence": origin.sequence if origin else None, "step_id": None, "variant": None,
                "sender": origin.sender if origin else None, "payload": {}, "dedupe_key": f"unsubscribe:{prospect_id}",
            }
            fresh = insert_events(conn, ws.store.is_postgres, [row])
            rules.apply(conn, ws, fresh, now)
            domain = company_domain(email)
            if whole_domain and domain:
                suppress(conn, "domain", domain, "unsubscribed (whole company)", source=f"one-click:{prospect_id}", now=now)
        return prospect_id, enrollment_id

    def _domain_choice(token: str) -> str:
        """The opt-out page offers to stop contacting the whole company, never a webmail."""
        try:
            prospect_id, _ = tokens.read(token)
        except TerminalError:
            return ""
        with ws.store.connect() as conn:
            domain = company_domain(conn.scalar(select(prospects.c.email).where(prospects.c.id == prospect_id)))
        if not domain:
            return ""
        return (
            f'<p><label><input type="checkbox" name="scope" value="domain"> Ne plus contacter personne chez '
            f"{html.escape(domain)} / Stop contacting anyone at {html.escape(domain)}</label></p>"
        )

    @app.get("/u/{token}")
    def confirm_page(token: str) -> HTMLResponse:
        try:
            tokens.read(token)
        except TerminalError:
            return _page("Lien invalide", "<h1>Lien invalide</h1><p>Ce lien de désinscription n'est pas valide.</p>", 404)
        company = html.escape(ws.config.company.name)
        return _page(
            "Désinscription",
            f"<h1>Ne plus recevoir de messages de {company}</h1>"
            f'<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">{_domain_choice(token)}'
            f'<button type="submit">Confirmer / Confirm</button></form>',
        )

    @app.post("/u/{token}")
    async def one_click(token: str, request: Request) -> HTMLResponse:
        whole_domain = False
        if request.headers.get("content-type", "").startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
            try:
                whole_domain = (await request.form()).get("scope") == "domain"
            except Exception:  # a mail client's malformed body is still a valid one-click opt-out
                whole_domain = False
        if _unsubscribe(token, whole_domain) is None:
            return _page("Lien invalide", "<h1>Lien invalide</h1>", 404)
        return _page("Désinscrit", "<h1>C'est fait.</h1><p>Vous ne recevrez plus de messages de notre part. / You are unsubscribed.</p>")

    @app.post("/webhooks/{channel}")
    async def webhook(channel: str, request: Request) -> JSONResponse:
        try:
            chan = Channel(channel)
            connector = ws.connector(chan)
        except (ValueError, UserInputError):
            return JSONResponse({"error": f"no connector for channel {channel!r}"}, status_code=404)
        body = await request.body()
        try:
            inbound = connector.parse_webhook(dict(request.headers), body)
        except Unauthenticated as exc:
            return JSONResponse({"error": str(exc)}, status_code=401)
        except TerminalError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        summary = ingest(ws, inbound, clock())
        return JSONResponse(summary.as_dict())

    @app.get("/tasks")
    def task_inbox(owner: str | None = None) -> HTMLResponse:
        rows = open_tasks(ws, clock(), owner)
        items = []
        for t in rows:
            who = html.escape(" ".join(p for p in (t["first_name"], t["last_name"]) if p))
            items.append(
                f"<li><h3>#{t['id']} {html.escape(t['title'])}</h3><p>{who} — {html.escape(t['company'] or '')}</p>"
                f"<pre>{html.escape(t['body'] or '')}</pre>"
                f'<form method="post" action="/tasks/{t["id"]}"><select name="outcome">'
                + "".join(f'<option value="{o}">{o}</option>' for o in _outcomes(t["channel"]))
                + '</select> <button type="submit">Done</button></form></li>'
            )
        return _page("Tasks", f"<h1>Tasks ({len(rows)})</h1><ul>{''.join(items) or '<li>nothing to do</li>'}</ul>", lang="en")

    @app.post("/tasks/{task_id}")
    def close_task(task_id: int, outcome: str = Form(...), note: str | None = Form(None)):
        try:
            complete_task(ws, task_id, outcome, clock(), note)
        except UserInputError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return RedirectResponse("/tasks", status_code=303)

    return app


def _outcomes(channel: str) -> list[str]:
    if channel == "call":
        return ["connected", "voicemail", "no_answer", "wrong_number", "meeting_booked", "disqualified"]
    if channel == "linkedin":
        return ["done", "accepted", "replied", "skipped"]
    return ["done", "skipped", "meeting_booked", "qualified", "disqualified"]
