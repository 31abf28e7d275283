"""The engine end to end on the store, with the sandbox connectors, on a simulated clock."""

from __future__ import annotations

import json
import re
import threading
from datetime import timedelta
from email import policy
from email.parser import BytesParser
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, insert, select, update

from relance.channels import InboundEvent
from relance.dispatch import Dispatcher
from relance.enrollment import enroll
from relance.events import Channel, EventKind
from relance.inbox import complete_task, open_tasks
from relance.ingest import ingest, poll_all
from relance.planning import pick_variant
from relance.store import enrollments, events, prospects, touches
from relance.suppression import suppress
from relance.workspace import Workspace
from tests.conftest import at, database_url, write_workspace

MONDAY = at("2027-03-15T07:00:00")  # 08:00 in Paris: before the window opens


def add_prospects(ws: Workspace, *rows: dict) -> list[int]:
    now = MONDAY
    defaults = {"timezone": "Europe/Paris", "country": "FR", "attributes": {}, "created_at": now, "updated_at": now}
    with ws.store.begin() as conn:
        return list(conn.execute(insert(prospects).returning(prospects.c.id, sort_by_parameter_order=True), [{**defaults, **r} for r in rows]).scalars())


def person(i: int, **extra) -> dict:
    return {
        "email": f"p{i}@client{i}.example",
        "first_name": f"Prénom{i}",
        "last_name": f"Nom{i}",
        "company": f"Client {i}",
        "phone": f"+3361234{i:04d}",
        "linkedin_url": f"https://www.linkedin.com/in/p{i}",
        **extra,
    }


def run_until(ws: Workspace, start, end, step=timedelta(minutes=30)) -> None:
    dispatcher = Dispatcher(ws)
    now = start
    while now <= end:
        poll_all(ws, now)
        dispatcher.run(now)
        now += step


def touch_rows(ws: Workspace, **where) -> list:
    query = select(touches)
    for key, value in where.items():
        query = query.where(getattr(touches.c, key) == value)
    with ws.store.connect() as conn:
        return conn.execute(query.order_by(touches.c.id)).all()


def enrollment(ws: Workspace, prospect_id: int, sequence: str = "outbound"):
    with ws.store.connect() as conn:
        return conn.execute(select(enrollments).where(enrollments.c.prospect_id == prospect_id, enrollments.c.sequence == sequence)).one()


@pytest.fixture
def ws(workspace_dir: Path):
    w = Workspace.load(workspace_dir)
    yield w
    w.close()


def test_first_touch_waits_for_the_window_then_goes_out_once(ws: Workspace):
    [pid] = add_prospects(ws, person(1))
    report = enroll(ws, ws.sequence("outbound"), [pid], MONDAY)
    assert report.enrolled == 1
    due = enrollment(ws, pid).next_due_at
    assert at("2027-03-15T08:00:00") <= due < at("2027-03-15T08:10:00")  # 09:00-09:10 Paris

    assert Dispatcher(ws).run(MONDAY).claimed == 0  # nothing is due before the window
    summary = Dispatcher(ws).run(due)
    assert summary.sent == {"email": 1}
    assert Dispatcher(ws).run(due + timedelta(minutes=5)).claimed == 0  # never twice

    [touch] = touch_rows(ws, step_id="intro")
    assert touch.status == "sent" and touch.idempotency_key == f"{enrollment(ws, pid).id}:intro"
    assert touch.spec_version == ws.sequence("outbound").version
    eml = next((ws.root / "outbox" / "email").glob("*.eml"))
    message = BytesParser(policy=policy.default).parse(eml.open("rb"))
    assert message["To"].addresses[0].addr_spec == "p1@client1.example"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert enrollment(ws, pid).next_step_id == "invite"


def test_multichannel_cadence_runs_every_step_in_order(ws: Workspace):
    [pid] = add_prospects(ws, person(1))
    enroll(ws, ws.sequence("outbound"), [pid], MONDAY)
    run_until(ws, MONDAY, MONDAY + timedelta(days=14))
    steps = [(t.step_id, t.status) for t in touch_rows(ws)]
    # Nobody opened, nobody accepted: the bump goes, the LinkedIn message is skipped.
    assert steps == [("intro", "sent"), ("invite", "sent"), ("call-1", "sent"), ("bump", "sent"), ("message", "skipped")]
    assert enrollment(ws, pid).state == "completed"
    sent = {t.step_id: t.sent_at for t in touch_rows(ws, status="sent")}
    # Business days: Monday intro, Tuesday invite, Wednesday call, Friday bump.
    paris = ZoneInfo("Europe/Paris")
    assert [sent[s].astimezone(paris).weekday() for s in ("intro", "invite", "call-1", "bump")] == [0, 1, 2, 4]
    bump = touch_rows(ws, step_id="bump")[0]
    intro = touch_rows(ws, step_id="intro")[0]
    assert bump.subject == f"Re: {intro.subject}"


def test_a_batch_writes_each_channels_touches_side_by_side(ws: Workspace):
    """Each channel's delivery rewrites its touch rows: grouped, they share pages, and a
    channel's delivery no longer rewrites every page of the batch."""
    pids = add_prospects(ws, *(person(i) for i in range(1, 10)))
    enroll(ws, ws.sequence("outbound"), pids, MONDAY)
    due = at("2027-03-16T08:30:00")  # Tuesday, 09:30 in Paris
    with ws.store.begin() as conn:
        for pid, step in zip(pids, ["intro", "invite", "call-1"] * 3):  # channels interleaved by enrollment
            conn.execute(update(enrollments).where(enrollments.c.prospect_id == pid).values(next_step_id=step, next_due_at=due))
    Dispatcher(ws).run(due)
    channels = [t.channel for t in touch_rows(ws)]
    assert sorted(channels) == ["call"] * 3 + ["email"] * 3 + ["linkedin"] * 3
    runs = [c for i, c in enumerate(channels) if i == 0 or channels[i - 1] != c]
    assert len(runs) == 3  # one contiguous run of ids per channel


def test_a_reply_ends_the_cadence_before_its_next_touch(ws: Workspace):
    [pid] = add_prospects(ws, person(1))
    enroll(ws, ws.sequence("outbound"), [pid], MONDAY)
    run_until(ws, MONDAY, at("2027-03-15T12:00:00"))
    [intro] = touch_rows(ws, step_id="intro")
    reply = InboundEvent(EventKind.replied, Channel.email, at("2027-03-15T15:00:00"), "imap:reply-1", message_id=intro.message_id)
    summary = ingest(ws, [reply], at("2027-03-15T15:00:00"))
    assert summary.recorded == 1 and summary.exited == 1
    assert enrollment(ws, pid).state == "exited"
    run_until(ws, at("2027-03-15T15:00:00"), MONDAY + timedelta(days=10))
    assert [t.step_id for t in touch_rows(ws)] == ["intro"]
    # Ingesting the same provider event again changes nothing.
    assert ingest(ws, [reply], at("2027-03-16T08:00:00")).duplicates == 1


def test_condition_branch_taken_and_not_taken(ws: Workspace):
    a, b = add_prospects(ws, person(1), person(2))
    enroll(ws, ws.sequence("outbound"), [a, b], MONDAY)
    run_until(ws, MONDAY, at("2027-03-15T16:00:00"))
    intro_a = next(t for t in touch_rows(ws, step_id="intro") if t.prospect_id == a)
    ingest(ws, [InboundEvent(EventKind.opened, Channel.email, at("2027-03-15T16:00:00"), "open-a", touch_id=intro_a.id)], at("2027-03-15T16:00:00"))
    run_until(ws, at("2027-03-15T16:00:00"), MONDAY + timedelta(days=10))
    bumps = {t.prospect_id: t.status for t in touch_rows(ws, step_id="bump")}
    assert bumps == {a: "skipped", b: "sent"}


def test_variant_assignment_is_stable_and_recorded(ws: Workspace):
    ids = add_prospects(ws, *[person(i) for i in range(40)])
    seq = ws.sequence("outbound")
    enroll(ws, seq, ids, MONDAY)
    run_until(ws, MONDAY, at("2027-03-15T11:00:00"))
    variants = seq.steps[0].email.variants
    recorded = {t.prospect_id: t.variant for t in touch_rows(ws, step_id="intro")}
    assert recorded == {pid: pick_variant(variants, seq.name, "intro", pid).id for pid in ids}
    assert set(recorded.values()) == {"a", "b"}  # both arms are used
    again = {pid: pick_variant(variants, seq.name, "intro", pid).id for pid in ids}
    assert again == recorded


def test_exclusivity_and_suppression_at_enrollment(ws: Workspace):
    a, b, c = add_prospects(ws, person(1), person(2), person(3))
    with ws.store.begin() as conn:
        suppress(conn, "domain", "client3.example", "competitor", now=MONDAY)
    first = enroll(ws, ws.sequence("outbound"), [a, b, c], MONDAY)
    assert first.enrolled == 2 and first.skipped == {"suppressed: competitor (domain)": 1}
    again = enroll(ws, ws.sequence("outbound"), [a], MONDAY)
    assert again.skipped == {"already in this sequence": 1}
    # A second exclusive sequence refuses a busy prospect; a non-exclusive nurture accepts it.
    other = ws.sequence("outbound").model_copy(update={"name": "other-outbound"})
    assert enroll(ws, other, [a], MONDAY).skipped == {"active in another exclusive sequence": 1}
    assert enroll(ws, ws.sequence("nurture"), [a], MONDAY).enrolled == 1


def test_suppression_takes_effect_before_the_next_send(ws: Workspace):
    a, b = add_prospects(ws, person(1), person(2))
    enroll(ws, ws.sequence("outbound"), [a, b], MONDAY)
    with ws.store.begin() as conn:
        suppress(conn, "email", "p1@client1.example", "unsubscribed by phone", now=MONDAY)
    run_until(ws, MONDAY, MONDAY + timedelta(days=10))
    assert {t.prospect_id for t in touch_rows(ws)} == {b}
    assert enrollment(ws, a).state == "exited"


def test_a_template_error_on_one_prospect_does_not_stop_the_batch(backend: str, tmp_path: Path):
    root = write_workspace(
        tmp_path / "ws",
        database_url(backend, tmp_path),
        templates={"email/intro.j2": "Votre plan : {{ prospect.attributes.plan.upper() }}\n{% include 'email/_footer.j2' %}\n"},
    )
    ws = Workspace.load(root)
    ids = add_prospects(ws, person(1, attributes={"plan": "pro"}), person(2), person(3, attributes={"plan": "team"}))
    enroll(ws, ws.sequence("outbound"), ids, MONDAY)
    summary = Dispatcher(ws).run(at("2027-03-15T09:00:00"))
    assert summary.sent == {"email": 2} and summary.failed == {"email": 1} and summary.paused == 1
    assert "plan" in summary.errors[0]
    broken = enrollment(ws, ids[1])
    assert broken.state == "paused" and "intro" in broken.reason
    [failed] = touch_rows(ws, status="failed")
    assert failed.prospect_id == ids[1] and "plan" in failed.error
    ws.close()


def test_hostile_prospect_fields_are_rendered_as_inert_data(ws: Workspace):
    [pid] = add_prospects(ws, person(1, first_name="Zoé\r\nBcc: victim@evil.example", company="{{ 7*7 }} & {% raw %}"))
    enroll(ws, ws.sequence("outbound"), [pid], MONDAY)
    Dispatcher(ws).run(at("2027-03-15T09:00:00"))
    [touch] = touch_rows(ws, step_id="intro")
    assert touch.status == "sent"
    raw = next((ws.root / "outbox" / "email").glob("*.eml")).read_bytes()
    message = BytesParser(policy=policy.default).parsebytes(raw)
    assert message["Bcc"] is None and b"\r\nBcc:" not in raw.split(b"\r\n\r\n")[0]
    body = message.get_body(("plain",)).get_content()
    text_only = re.sub(r"https?://\S+", "", body)  # the signed opt-out link may hold any digits
    assert "{{ 7*7 }} & {% raw %}" in body and "49" not in text_only
    if touch.variant == "a":
        assert "{{ 7*7 }}" in message["Subject"]


def test_capacity_limit_defers_instead_of_failing(backend: str, tmp_path: Path):
    ws = Workspace.load(write_workspace(tmp_path / "ws", database_url(backend, tmp_path), daily=2))
    ids = add_prospects(ws, *[person(i) for i in range(6)])
    enroll(ws, ws.sequence("outbound"), ids, MONDAY)
    summary = Dispatcher(ws).run(at("2027-03-15T09:00:00"))
    # Two mailboxes, two emails a day each.
    assert sum(summary.sent.values()) <= 4 and summary.deferred >= 2
    with ws.store.connect() as conn:
        per_sender = dict(conn.execute(select(touches.c.sender, func.count()).group_by(touches.c.sender)).all())
    assert all(count <= 2 for count in per_sender.values())
    ws.close()


def test_two_workers_never_spend_the_same_capacity(backend: str, tmp_path: Path):
    """Worker B counted its senders' capacity, then worker A sent from them: B's next batch,
    moments later, must see A's sends and not its own stale count."""
    root = write_workspace(tmp_path / "ws", database_url(backend, tmp_path), daily=2)
    ws_a, ws_b = Workspace.load(root), Workspace.load(root)
    try:
        ids = add_prospects(ws_a, *[person(i) for i in range(12)])
        enroll(ws_a, ws_a.sequence("outbound"), ids, MONDAY)
        now = at("2027-03-15T09:00:00")
        a, b = Dispatcher(ws_a, owner="worker-a"), Dispatcher(ws_b, owner="worker-b")

        def batch(worker: Dispatcher, limit: int) -> int:
            prepared = worker.prepare(worker.claim(now, limit=limit), now)
            return sum(sum(worker.deliver(channel, outbound, now).sent.values()) for channel, outbound in prepared.outbound.items())

        # B counts the mailboxes' day and spends some of it, A spends more: B's last batch
        # must see A's sends, not its own count of a moment ago.
        sent = [batch(b, 2), batch(a, 4), batch(b, 12)]
        assert sent[0] >= 1 and sent[1] >= 1 and sum(sent) == 4  # two mailboxes, two a day each
        with ws_a.store.connect() as conn:
            per_sender = dict(conn.execute(select(touches.c.sender, func.count()).where(touches.c.status == "sent").group_by(touches.c.sender)).all())
        assert per_sender == {"marie@acme.example": 2, "lea@acme.example": 2}
    finally:
        ws_a.close()
        ws_b.close()


def test_workers_dispatching_at_once_stay_under_every_cap(backend: str, tmp_path: Path):
    root = write_workspace(tmp_path / "ws", database_url(backend, tmp_path), daily=5, batch=7)
    workspaces = [Workspace.load(root) for _ in range(3)]
    try:
        ids = add_prospects(workspaces[0], *[person(i) for i in range(40)])
        enroll(workspaces[0], workspaces[0].sequence("outbound"), ids, MONDAY)
        start = threading.Barrier(len(workspaces))
        errors: list[BaseException] = []

        def work(ws: Workspace, name: str) -> None:
            try:
                start.wait()
                Dispatcher(ws, owner=name).run(at("2027-03-15T09:00:00"))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(ws, f"worker-{i}")) for i, ws in enumerate(workspaces)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        with workspaces[0].store.connect() as conn:
            per_sender = dict(conn.execute(select(touches.c.sender, func.count()).where(touches.c.status == "sent").group_by(touches.c.sender)).all())
        assert per_sender == {"marie@acme.example": 5, "lea@acme.example": 5}  # 40 due, 5 a day each
    finally:
        for ws in workspaces:
            ws.close()


def _with_config(root: Path, **changes) -> Path:
    import yaml

    data = yaml.safe_load((root / "config.yaml").read_text())
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        node = data
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    (root / "config.yaml").write_text(yaml.safe_dump(data, allow_unicode=True))
    return root


def _sent_per_sender_and_domain(ws: Workspace) -> dict:
    with ws.store.connect() as conn:
        rows = conn.execute(select(touches.c.sender, touches.c.recipient).where(touches.c.channel == "email", touches.c.status == "sent")).all()
    out: dict = {}
    for sender, recipient in rows:
        key = (sender, recipient.rpartition("@")[2])
        out[key] = out.get(key, 0) + 1
    return out


def test_recipient_domain_cap_defers_the_rest_to_the_next_day(backend: str, tmp_path: Path):
    root = _with_config(write_workspace(tmp_path / "ws", database_url(backend, tmp_path)), limits__email_per_recipient_domain_per_day=2)
    ws = Workspace.load(root)
    try:
        same_company = [person(i, email=f"p{i}@bigcorp.example") for i in range(8)]
        ids = add_prospects(ws, *same_company, person(20))
        enroll(ws, ws.sequence("outbound"), ids, MONDAY)
        summary = Dispatcher(ws).run(at("2027-03-15T09:00:00"))
        assert summary.deferred >= 4  # waits for an opening instead of failing
        sent = _sent_per_sender_and_domain(ws)
        assert all(n <= 2 for (_, domain), n in sent.items() if domain == "bigcorp.example")
        assert sum(n for (_, d), n in sent.items() if d == "bigcorp.example") == 4  # two mailboxes, two each
        assert sent.get(next(k for k in sent if k[1] == "client20.example"), 0) == 1  # another domain is not held back
        with ws.store.connect() as conn:
            failed = conn.scalar(select(func.count()).select_from(touches).where(touches.c.status == "failed"))
        assert failed == 0
        run_until(ws, at("2027-03-15T09:30:00"), at("2027-03-17T18:00:00"))  # the next days take the rest
        assert sum(n for (_, d), n in _sent_per_sender_and_domain(ws).items() if d == "bigcorp.example") == 8
    finally:
        ws.close()


def test_a_warming_mailbox_sends_a_little_more_each_day(backend: str, tmp_path: Path):
    import yaml

    root = write_workspace(tmp_path / "ws", database_url(backend, tmp_path), daily=50)
    data = yaml.safe_load((root / "config.yaml").read_text())
    for box in data["senders"]["sales"]:
        box["warmup"] = {"start": "2027-03-15", "first_day": 1, "increase_per_day": 2}
    (root / "config.yaml").write_text(yaml.safe_dump(data, allow_unicode=True))
    ws = Workspace.load(root)
    try:
        ids = add_prospects(ws, *[person(i) for i in range(20)])
        enroll(ws, ws.sequence("outbound"), ids, MONDAY)

        def per_mailbox() -> dict:
            out: dict = {}
            for (sender, _), n in _sent_per_sender_and_domain(ws).items():
                out[sender] = out.get(sender, 0) + n
            return out

        Dispatcher(ws).run(at("2027-03-15T09:00:00"))
        assert per_mailbox() == {"lea@acme.example": 1, "marie@acme.example": 1}  # day 1: first_day
        Dispatcher(ws).run(at("2027-03-16T09:30:00"))  # caps are rolling: yesterday's 09:00 sends are 24.5 h old
        assert per_mailbox() == {"lea@acme.example": 4, "marie@acme.example": 4}  # day 2: three more each
    finally:
        ws.close()


def test_sticky_sender_for_every_email_of_an_enrollment(ws: Workspace):
    ids = add_prospects(ws, *[person(i) for i in range(10)])
    enroll(ws, ws.sequence("outbound"), ids, MONDAY)
    run_until(ws, MONDAY, MONDAY + timedelta(days=10))
    by_prospect: dict[int, set] = {}
    for t in touch_rows(ws, channel="email", status="sent"):
        by_prospect.setdefault(t.prospect_id, set()).add(t.sender)
    assert by_prospect and all(len(s) == 1 for s in by_prospect.values())
    for pid, senders in by_prospect.items():
        assert senders == {enrollment(ws, pid).sender}


def test_manual_call_creates_a_task_whose_outcome_conditions_see(backend: str, tmp_path: Path):
    sequence = (
        "name: outbound\nowner: marie@acme.example\nsender: {pool: sales}\n"
        "schedule: {window: {days: mon-fri, hours: ['09:00-18:00']}, holidays: FR}\n"
        "steps:\n"
        "  - id: call-1\n    call: {script: call/script.j2}\n"
        "  - id: voicemail-email\n    wait: 1 day\n    when: \"call_outcome('call-1') == 'voicemail'\"\n"
        "    email: {template: email/bump.j2, subject: 'Suite à mon appel'}\n"
    )
    ws = Workspace.load(write_workspace(tmp_path / "ws", database_url(backend, tmp_path), call="manual", sequences={"o.yaml": sequence}))
    a, b = add_prospects(ws, person(1), person(2))
    enroll(ws, ws.sequence("outbound"), [a, b], MONDAY)
    summary = Dispatcher(ws).run(at("2027-03-15T09:00:00"))
    assert summary.tasks == {"call": 2}
    inbox = open_tasks(ws, at("2027-03-15T09:00:00"))
    assert len(inbox) == 2 and "Appeler Prénom1 Nom1" in inbox[0]["body"]
    outcomes = {a: "voicemail", b: "connected"}
    for task in inbox:
        complete_task(ws, task["id"], outcomes[task["prospect_id"]], at("2027-03-15T10:00:00"))
    run_until(ws, at("2027-03-15T10:00:00"), at("2027-03-18T10:00:00"))
    emails = {t.prospect_id: t.status for t in touch_rows(ws, step_id="voicemail-email")}
    assert emails == {a: "sent", b: "skipped"}
    with ws.store.connect() as conn:
        kinds = sorted(conn.scalars(select(events.c.kind).where(events.c.channel == "call")))
    assert kinds == ["call_connected", "call_voicemail", "queued", "queued", "sent", "sent"]
    ws.close()


def test_meeting_booked_on_a_task_exits_and_disqualified_routes_to_nurture(ws: Workspace):
    a, b = add_prospects(ws, person(1), person(2))
    enroll(ws, ws.sequence("outbound"), [a, b], MONDAY)
    run_until(ws, MONDAY, at("2027-03-15T12:00:00"))
    touch_a = touch_rows(ws, prospect_id=a)[0]
    touch_b = touch_rows(ws, prospect_id=b)[0]
    now = at("2027-03-15T13:00:00")
    ingest(ws, [InboundEvent(EventKind.meeting_booked, Channel.email, now, "mtg-a", touch_id=touch_a.id)], now)
    ingest(ws, [InboundEvent(EventKind.disqualified, Channel.email, now, "dq-b", touch_id=touch_b.id)], now)
    assert enrollment(ws, a).state == "exited" and enrollment(ws, a).reason == "meeting_booked received"
    assert enrollment(ws, b).state == "exited"
    nurture = enrollment(ws, b, "nurture")
    assert nurture.state == "active" and nurture.next_step_id == "news"


def test_editing_the_cadence_affects_enrollments_in_flight_from_their_next_step(backend: str, tmp_path: Path):
    root = write_workspace(tmp_path / "ws", database_url(backend, tmp_path))
    ws = Workspace.load(root)
    [pid] = add_prospects(ws, person(1))
    enroll(ws, ws.sequence("outbound"), [pid], MONDAY)
    run_until(ws, MONDAY, at("2027-03-15T12:00:00"))
    old_version = ws.sequence("outbound").version
    ws.close()
    # Remove the invite step the enrollment is waiting for.
    path = root / "sequences" / "outbound.yaml"
    text = path.read_text()
    start = text.index("  - id: invite")
    end = text.index("  - id: call-1")
    path.write_text(text[:start] + text[end:])
    ws = Workspace.load(root)
    run_until(ws, at("2027-03-15T12:00:00"), MONDAY + timedelta(days=10))
    rows = touch_rows(ws)
    assert [t.step_id for t in rows][:2] == ["intro", "call-1"]
    assert rows[0].spec_version == old_version and rows[1].spec_version == ws.sequence("outbound").version != old_version
    ws.close()


def test_transient_failures_retry_with_backoff_then_send_once(backend: str, tmp_path: Path):
    root = write_workspace(tmp_path / "ws", database_url(backend, tmp_path))
    config = root / "config.yaml"
    config.write_text(config.read_text().replace("seed: 3, rates:", "seed: 3, fail_rate: 1.0, retry_after_seconds: 600, rates:", 1))
    ws = Workspace.load(root)
    [pid] = add_prospects(ws, person(1))
    enroll(ws, ws.sequence("outbound"), [pid], MONDAY)
    now = at("2027-03-15T09:00:00")
    summary = Dispatcher(ws).run(now)
    assert summary.retried == {"email": 1}
    row = enrollment(ws, pid)
    assert row.state == "active" and row.next_due_at >= now + timedelta(seconds=600)  # Retry-After honoured
    ws.close()
    config.write_text(config.read_text().replace("fail_rate: 1.0", "fail_rate: 0.0"))
    ws = Workspace.load(root)
    Dispatcher(ws).run(now + timedelta(hours=1))
    [touch] = touch_rows(ws, step_id="intro")
    assert touch.status == "sent" and touch.attempts == 2
    ws.close()


def test_a_crash_mid_send_is_reconciled_not_resent_blindly(ws: Workspace):
    [pid] = add_prospects(ws, person(1))
    enroll(ws, ws.sequence("outbound"), [pid], MONDAY)
    now = at("2027-03-15T09:00:00")
    dead = Dispatcher(ws, owner="dead-worker")
    batch = dead.prepare(dead.claim(now), now)  # the worker dies before recording anything
    [outbound] = batch.outbound[Channel.email]
    ws.connector(Channel.email).send_batch([outbound], now)  # ...after the provider accepted it
    later = now + timedelta(seconds=ws.config.dispatch.lease_seconds + 1)
    Dispatcher(ws).run(later)  # the sandbox is idempotent: resent with the same key, deduped
    [touch] = touch_rows(ws, step_id="intro")
    assert touch.status == "sent"
    assert len(list((ws.root / "outbox" / "email").glob("*.eml"))) == 1


@pytest.mark.postgres
def test_two_dispatchers_on_postgres_never_claim_the_same_enrollment(postgres_lock, tmp_path: Path):
    root = write_workspace(tmp_path / "ws", database_url("postgres", tmp_path), batch=50, daily=10_000)
    ws = Workspace.load(root)
    ids = add_prospects(ws, *[person(i) for i in range(400)])
    enroll(ws, ws.sequence("outbound"), ids, MONDAY)
    now = at("2027-03-15T09:30:00")
    claims: dict[str, list[int]] = {"one": [], "two": []}
    ready = threading.Barrier(2)  # loading a workspace takes longer than dispatching 400: start together

    def work(name: str) -> None:
        worker = Workspace.load(root)
        dispatcher = Dispatcher(worker, owner=name)
        ready.wait(timeout=60)
        while ids_ := dispatcher.claim(now):
            claims[name].extend(ids_)
            batch = dispatcher.prepare(ids_, now)
            for channel, outbound in batch.outbound.items():
                dispatcher.deliver(channel, outbound, now)
        worker.close()

    threads = [threading.Thread(target=work, args=(n,)) for n in claims]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert claims["one"] and claims["two"], "both workers took part"
    assert not set(claims["one"]) & set(claims["two"])
    assert len(claims["one"]) + len(claims["two"]) == 400
    rows = touch_rows(ws, step_id="intro")
    assert len(rows) == 400 and len({r.idempotency_key for r in rows}) == 400
    assert all(r.status == "sent" for r in rows), [(r.status, r.error) for r in rows if r.status != "sent"][:5]
    ws.close()


def test_leases_run_from_when_they_are_handed_out_and_are_renewed_before_a_send(backend: str, tmp_path: Path, monkeypatch):
    """A run that started ten minutes ago (its `now`) must not hand out leases a newer run
    already sees as expired; and a batch's leases are renewed right before the provider call."""
    import relance.dispatch as dispatch_module

    clock = [1000.0]  # the monotonic clock the dispatcher measures elapsed time with
    monkeypatch.setattr(dispatch_module.time, "monotonic", lambda: clock[0])
    ws = Workspace.load(write_workspace(tmp_path / "ws", database_url(backend, tmp_path)))
    try:
        started = at("2027-03-16T09:00:00")  # a Tuesday, 10:00 in Paris
        a, b = add_prospects(ws, person(1), person(2))
        enroll(ws, ws.sequence("outbound"), [a, b], MONDAY)
        old_run, new_run = Dispatcher(ws), Dispatcher(ws)
        lease = timedelta(seconds=ws.config.dispatch.lease_seconds)

        def lease_of(pid: int):
            with ws.store.connect() as conn:
                return conn.scalar(select(enrollments.c.lease_expires_at).where(enrollments.c.prospect_id == pid))

        [first] = old_run.claim(started, limit=1)
        assert lease_of(a) == started + lease
        clock[0] += 600  # ten minutes into the old run, it claims its next batch
        [second] = old_run.claim(started, limit=1)
        assert lease_of(b) == started + timedelta(minutes=10) + lease
        # A run starting now may take the first (its lease is five minutes old), never the second.
        assert new_run.claim(started + timedelta(minutes=10)) == [first]

        batch = old_run.prepare([second], started)
        [(channel, outbound)] = batch.outbound.items()
        connector = ws.connector(channel)
        send, seen = connector.send_batch, []

        def watching(touches, now):
            seen.append(lease_of(b))
            return send(touches, now)

        connector.send_batch = watching
        clock[0] += 240  # the batch took four more minutes to prepare
        old_run.deliver(channel, outbound, started)
        assert seen == [started + timedelta(minutes=14) + lease]  # renewed right before the call
    finally:
        ws.close()


def two_channel_batch(ws: Workspace, now):
    """A claimed and prepared batch of two prospects, one due for the intro email, one for the
    LinkedIn invite: (their ids, the dispatcher, the batch)."""
    a, b = add_prospects(ws, person(1), person(2))
    enroll(ws, ws.sequence("outbound"), [a, b], MONDAY)
    with ws.store.begin() as conn:
        conn.execute(update(enrollments).where(enrollments.c.prospect_id == b).values(next_step_id="invite", next_due_at=now))
    d = Dispatcher(ws)
    batch = d.prepare(d.claim(now), now)
    assert set(batch.outbound) == {Channel.email, Channel.linkedin}
    return a, b, d, batch


def test_a_batch_renews_the_leases_of_its_other_channels_too(backend: str, tmp_path: Path, monkeypatch):
    """Channels send one after the other: while the first one's provider is slow, the leases
    of the touches still waiting on another channel must not lapse."""
    import relance.dispatch as dispatch_module

    clock = [1000.0]
    monkeypatch.setattr(dispatch_module.time, "monotonic", lambda: clock[0])
    ws = Workspace.load(write_workspace(tmp_path / "ws", database_url(backend, tmp_path)))
    try:
        now = at("2027-03-16T09:00:00")
        a, b, d, batch = two_channel_batch(ws, now)
        lease = timedelta(seconds=ws.config.dispatch.lease_seconds)
        clock[0] += 200  # the batch's leases are 200 s old when the email goes out
        d.deliver(Channel.email, batch.outbound[Channel.email], now)
        assert enrollment(ws, b).lease_expires_at == now + timedelta(seconds=200) + lease
        clock[0] += 50  # renewed 50 s ago: the LinkedIn call goes without renewing again
        d.deliver(Channel.linkedin, batch.outbound[Channel.linkedin], now)
        assert [r.status for r in touch_rows(ws)] == ["sent", "sent"]
    finally:
        ws.close()


def test_a_renewal_skips_the_rows_another_channel_is_recording(postgres_lock, tmp_path: Path, monkeypatch):
    """PostgreSQL: channels send side by side, so while one channel renews the batch's leases
    another may be recording (and holding) its own rows; the renewal must pass them by, not
    wait: waiting could deadlock with that record."""
    import relance.dispatch as dispatch_module

    clock = [1000.0]
    monkeypatch.setattr(dispatch_module.time, "monotonic", lambda: clock[0])
    ws = Workspace.load(write_workspace(tmp_path / "ws", database_url("postgres", tmp_path)))
    try:
        now = at("2027-03-16T09:00:00")
        a, b, d, batch = two_channel_batch(ws, now)
        lease = timedelta(seconds=ws.config.dispatch.lease_seconds)
        clock[0] += 200
        with ws.store.engine.connect() as recording:  # the email channel's record, mid-transaction
            recording.execute(select(enrollments.c.id).where(enrollments.c.prospect_id == a).with_for_update())
            renewal = threading.Thread(target=d.renew, args=(batch.outbound[Channel.linkedin], now))
            renewal.start()
            renewal.join(timeout=20)
            assert not renewal.is_alive(), "the renewal waited for the row the other channel holds"
            recording.rollback()
        assert enrollment(ws, b).lease_expires_at == now + timedelta(seconds=200) + lease
        assert enrollment(ws, a).lease_expires_at == now + lease  # skipped: its record releases it
    finally:
        ws.close()


def test_a_connector_with_a_max_batch_gets_calls_of_that_size_each_recorded_before_the_next(backend: str, tmp_path: Path, monkeypatch):
    """A provider that sends one message at a time takes a batch in slices: every slice's
    outcomes are in the store before the next slice is handed over."""
    ws = Workspace.load(write_workspace(tmp_path / "ws", database_url(backend, tmp_path)))
    try:
        now = at("2027-03-16T09:00:00")
        ids = add_prospects(ws, *(person(i) for i in range(5)))
        enroll(ws, ws.sequence("outbound"), ids, MONDAY)
        d = Dispatcher(ws)
        batch = d.prepare(d.claim(now), now)
        connector = ws.connector(Channel.email)
        monkeypatch.setattr(type(connector), "max_batch", 2)
        send, calls = connector.send_batch, []

        def watching(touches, when):
            calls.append((len(touches), sum(r.status == "sent" for r in touch_rows(ws))))
            return send(touches, when)

        monkeypatch.setattr(connector, "send_batch", watching)
        summary = d.deliver(Channel.email, batch.outbound[Channel.email], now)
        assert calls == [(2, 0), (2, 2), (1, 4)]  # (slice size, touches already recorded sent)
        assert summary.sent == {"email": 5}
        assert all(r.status == "sent" for r in touch_rows(ws))
    finally:
        ws.close()


def test_a_run_raises_the_collector_threshold_and_restores_it():
    import gc

    from relance.dispatch import fewer_collections

    before = gc.get_threshold()
    with fewer_collections(threshold=12_345):
        assert gc.get_threshold()[0] == 12_345 and gc.get_freeze_count() > 0
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_a_batch_is_renewed_by_the_age_of_its_own_leases_not_the_last_claim(backend: str, tmp_path: Path, monkeypatch):
    """On PostgreSQL the flow claims the next batch while the previous one sends: that fresh
    claim must not stop the older batch's leases being renewed before its provider call."""
    import relance.dispatch as dispatch_module

    clock = [1000.0]
    monkeypatch.setattr(dispatch_module.time, "monotonic", lambda: clock[0])
    ws = Workspace.load(write_workspace(tmp_path / "ws", database_url(backend, tmp_path)))
    try:
        now = at("2027-03-16T09:00:00")
        a, b = add_prospects(ws, person(1), person(2))
        enroll(ws, ws.sequence("outbound"), [a, b], MONDAY)
        d = Dispatcher(ws)
        lease = timedelta(seconds=ws.config.dispatch.lease_seconds)
        first = d.claim(now, limit=1)
        batch = d.prepare(first, now)
        clock[0] += 200  # the first batch's leases are now 200 s old
        d.claim(now, limit=1)  # the next batch, claimed just now
        [(channel, outbound)] = batch.outbound.items()
        connector = ws.connector(channel)
        send, seen = connector.send_batch, []

        def watching(touches, when):
            with ws.store.connect() as conn:
                seen.append(conn.scalar(select(enrollments.c.lease_expires_at).where(enrollments.c.id == first[0])))
            return send(touches, when)

        connector.send_batch = watching
        d.deliver(channel, outbound, now)
        assert seen == [now + timedelta(seconds=200) + lease]
    finally:
        ws.close()


def test_an_opt_out_link_is_signed_for_emails_and_templates_that_show_it(backend: str, tmp_path: Path, monkeypatch):
    from relance.tokens import UnsubscribeTokens

    invite = "Bonjour {{ prospect.first_name }}. Ne plus être contacté : {{ unsubscribe_url }}"
    root = write_workspace(tmp_path / "ws", database_url(backend, tmp_path), templates={"linkedin/invite.j2": invite})
    signed = []
    make = UnsubscribeTokens.make
    monkeypatch.setattr(UnsubscribeTokens, "make", lambda self, *a: signed.append(a) or make(self, *a))
    ws = Workspace.load(root)
    [pid] = add_prospects(ws, person(1))
    enroll(ws, ws.sequence("outbound"), [pid], MONDAY)
    run_until(ws, MONDAY, at("2027-03-17T18:00:00"))  # intro Monday, invite Tuesday, call Wednesday
    assert [t.step_id for t in touch_rows(ws, status="sent")] == ["intro", "invite", "call-1"]
    eid = enrollment(ws, pid).id
    # The email (its List-Unsubscribe header) and the invitation that shows the link; not the call.
    assert signed == [(pid, eid), (pid, eid)]
    [line] = (ws.root / "outbox" / "linkedin.jsonl").read_text().splitlines()
    token = re.search(r"https://links\.acme\.example/u/(\S+)", json.loads(line)["body"]).group(1)
    assert Dispatcher(ws).tokens.read(token) == (pid, eid)
    ws.close()
