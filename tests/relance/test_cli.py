"""The `relance` command on the example workspace, as an SDR would use it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from relance.cli import app

START = "2027-03-15T07:00:00Z"


@pytest.fixture
def cli(example_workspace: Path):
    runner = CliRunner()

    def run(*args: str, ok: bool = True):
        result = runner.invoke(app, [*args, "-w", str(example_workspace)], env={"RELANCE_NOW": START, "COLUMNS": "200"})
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return run


def test_validate_accepts_the_example_and_locates_a_broken_file(cli, example_workspace: Path):
    assert "every cadence and template is valid" in cli("validate").output
    broken = example_workspace / "sequences" / "broken.yaml"
    broken.write_text("name: broken\nsteps:\n  - id: intro\n    emial: {template: email/cfo-intro.j2}\n")
    result = cli("validate", ok=False)
    assert result.exit_code == 1
    assert "broken.yaml:4: steps.0.emial: unknown key 'emial'; allowed here: id, wait, when, email" in result.output


def test_schema_is_json_schema():
    result = CliRunner().invoke(app, ["schema"])
    schema = json.loads(result.output)
    assert "steps" in schema["properties"] and schema["title"] == "Relance cadence"


def test_import_enroll_preview_report_status(cli, example_workspace: Path):
    out = cli("import", str(example_workspace / "prospects" / "sample.csv")).output
    assert "220 imported" in out and "11 rejected" in out
    assert "jean.dupont@" in out and "Europe/Pariss" in out  # the broken rows, named

    out = cli("enroll", "cfo-outbound-fr", "--where", "language=fr").output
    assert "142 enrolled" in out
    out = cli("enroll", "cfo-outbound-fr", "--where", "language=fr").output
    assert "0 enrolled" in out and "already in this sequence" in out

    prospect = "ines.fabre@injection-lab.example"  # company: "{{ 7*7 }} Conseil & Finance"
    out = cli("preview", "cfo-outbound-fr", "--prospect", prospect).output
    assert "lun. 15" in out or "Mon 15 Mar 2027 09:" in out
    assert "{{ 7*7 }} Conseil" in out and "49 Conseil" not in out
    assert "CET" in out and "CEST" in out  # the timeline crosses the switch to summer time
    assert "skipped (when: accepted('invite'))" in out
    out = cli("preview", "cfo-outbound-fr", "--prospect", prospect, "--assume", "accepted:invite").output
    assert "skipped (when: accepted('invite'))" not in out

    report = json.loads(cli("report", "--format", "json").output)
    assert report["dimension"] == "channel" and report["rows"] == []
    assert "enrollments: {'active': 142}" in cli("status").output
    assert "no open task" in cli("tasks").output


def test_a_user_error_is_one_clear_line_and_exit_status_1(example_workspace: Path, monkeypatch, capsys):
    from relance.cli import main

    monkeypatch.setattr("sys.argv", ["relance", "enroll", "no-such-sequence", "-w", str(example_workspace)])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 1
    assert "unknown sequence 'no-such-sequence'" in capsys.readouterr().err


def test_erase_ends_the_cadence_and_a_reimport_is_refused(cli, example_workspace: Path):
    sample = str(example_workspace / "prospects" / "sample.csv")
    cli("import", sample)
    cli("enroll", "cfo-outbound-fr", "--where", "language=fr")
    assert "erased ines.fabre@injection-lab.example" in cli("erase", "ines.fabre@injection-lab.example").output
    assert "'exited': 1" in cli("status").output
    out = cli("import", sample).output
    assert "erased on request" in out
    gone = cli("preview", "cfo-outbound-fr", "--prospect", "ines.fabre@injection-lab.example", ok=False)
    assert gone.exit_code == 1 and "no prospect with email" in gone.output


def test_retention_blanks_prospects_idle_for_the_configured_period(cli, example_workspace: Path):
    out = cli("import", str(example_workspace / "prospects" / "sample.csv")).output
    imported = int(re.search(r"(\d+) imported", out).group(1))
    cli("enroll", "cfo-outbound-fr", "--where", "language=fr")
    enrolled = int(re.search(r"'active': (\d+)", cli("status").output).group(1))
    assert 0 < enrolled < imported
    three_years_on = "2030-03-16T07:00:00Z"  # 1095 days (config.yaml) after 2027-03-17: two days past the import
    assert "0 prospect(s) idle since 2027-03-15" in cli("retention", "--at", "2030-03-14T07:00:00Z").output  # imported at the cutoff
    preview = cli("retention", "--dry-run", "--at", three_years_on).output
    assert f"{imported - enrolled} prospect(s) idle since 2027-03-17 (1095 days): personal data would be blanked" in preview
    assert f"{imported - enrolled} prospect(s)" in cli("retention", "--at", three_years_on).output
    assert "0 prospect(s)" in cli("retention", "--at", three_years_on).output  # running cadences keep theirs
    config = example_workspace / "config.yaml"
    config.write_text(config.read_text().replace("retention_days: 1095", "retention_days: null"))
    kept = cli("retention", ok=False)
    assert kept.exit_code == 1 and "retention_days is not set" in kept.output


def test_suppress_a_whole_domain_on_request_ends_its_cadences(cli, example_workspace: Path):
    cli("import", str(example_workspace / "prospects" / "sample.csv"))
    cli("enroll", "cfo-outbound-fr", "--where", "language=fr")
    assert "suppressed: domain injection-lab.example" in cli("suppress", "Ines.Fabre@Injection-Lab.example", "--kind", "domain").output
    assert "already suppressed" in cli("suppress", "injection-lab.example", "--kind", "domain").output
    refused = cli("suppress", "gmail.com", "--kind", "domain", ok=False)
    assert refused.exit_code == 1 and "webmail" in refused.output
    assert cli("suppress", "x", "--kind", "fax", ok=False).exit_code == 1
    cli("run", "--at", "2027-03-15T10:00:00Z")  # the next dispatch ends the cadence instead of sending
    assert "'exited': 1" in cli("status").output


def test_report_deliverability_view_per_mailbox_and_sequence(workspace_dir: Path):
    """Emails really sent by dispatch, responses through ingest, the view read back from the CLI."""
    from datetime import timedelta

    from relance.channels import InboundEvent
    from relance.dispatch import Dispatcher
    from relance.enrollment import enroll
    from relance.events import Channel, EventKind
    from relance.ingest import ingest
    from relance.workspace import Workspace
    from tests.conftest import at
    from tests.relance.test_engine import MONDAY, add_prospects, person, touch_rows

    sent_at = at("2027-03-15T09:30:00")
    ws = Workspace.load(workspace_dir)
    try:
        ids = add_prospects(ws, *(person(i) for i in range(1, 9)))
        enroll(ws, ws.sequence("outbound"), ids, MONDAY)
        assert Dispatcher(ws).run(sent_at).sent == {"email": 8}
        sent = touch_rows(ws, step_id="intro")
        outcomes = [
            (EventKind.delivered, None), (EventKind.delivered, None), (EventKind.delivered, None),
            (EventKind.bounced, "hard"), (EventKind.bounced, "soft"), (EventKind.auto_replied, None),
            (EventKind.replied, None), (EventKind.complained, None), (EventKind.unsubscribed, None),
        ]
        later = sent_at + timedelta(hours=2)
        touched = [sent[0], sent[1], sent[2], sent[3], sent[4], sent[5], sent[5], sent[6], sent[7]]
        ingest(ws, [
            InboundEvent(kind=kind, channel=Channel.email, occurred_at=later, dedupe_key=f"test:{n}", touch_id=t.id, detail=detail)
            for n, ((kind, detail), t) in enumerate(zip(outcomes, touched))
        ], later)
        expected: dict[str, dict[str, int]] = {}
        for (kind, detail), t in zip(outcomes, touched):
            row = expected.setdefault(t.sender, {})
            key = f"bounced_{detail}" if detail else str(kind)
            row[key] = row.get(key, 0) + 1
        for t in sent:
            row = expected.setdefault(t.sender, {})
            row["sent"] = row.get("sent", 0) + 1
    finally:
        ws.close()

    runner = CliRunner()

    def cli(*args: str):
        return runner.invoke(app, ["report", *args, "-w", str(workspace_dir)], env={"COLUMNS": "200"})

    result = cli("--view", "deliverability", "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["view"] == "deliverability"
    by_sender = {row["sender"]: row for row in data["by_sender"]}
    assert set(by_sender) == set(expected) == {"marie@acme.example", "lea@acme.example"}  # both mailboxes of the pool
    for sender, counts in expected.items():
        assert {k: by_sender[sender][k] for k in counts} == counts, sender
    assert [row["sequence"] for row in data["by_sequence"]] == ["outbound"]
    totals = data["totals"]
    assert (totals["sent"], totals["delivered"], totals["bounced"], totals["bounced_hard"], totals["bounced_soft"]) == (8, 3, 2, 1, 1)
    assert (totals["auto_replied"], totals["replied"], totals["complained"], totals["unsubscribed"]) == (1, 1, 1, 1)
    assert totals["hard_bounce_rate"] == 1 / 8

    table = cli("--view", "deliverability")
    assert table.exit_code == 0, table.output
    for needle in ("Email deliverability by sender", "Email deliverability by sequence", "marie@acme.example",
                   "lea@acme.example", "outbound", "Hard bounces", "Soft bounces", "Auto-replies", "Opt-outs", "12.5%"):
        assert needle in table.output, needle
    lines = cli("--view", "deliverability", "--format", "csv").output.splitlines()
    assert lines[0].startswith("by,key,sent,delivered,bounced,") and lines[-1].startswith("TOTAL,,8,3,2,1,1,")
    assert "## Email deliverability by sequence" in cli("--view", "deliverability", "--format", "markdown").output
    only = json.loads(cli("--view", "deliverability", "--sequence", "nope", "--format", "json").output)
    assert only["by_sender"] == [] and only["totals"]["sent"] == 0
    before = json.loads(cli("--view", "deliverability", "--until", "2027-03-15T10:00:00Z", "--format", "json").output)
    assert before["totals"]["sent"] == 8 and before["totals"]["replied"] == 0  # the replies came at 11:30

    funnel = json.loads(cli("--format", "json").output)
    assert funnel["view"] == "funnel" and funnel["dimension"] == "channel"
    assert funnel["totals"]["email_auto_replied"] == 1

    for args, message in [
        (("--view", "deliverability", "--by", "step"), "--by applies to the funnel view"),
        (("--view", "health"), "--view 'health': use funnel or deliverability"),
        (("--format", "xml"), "--format 'xml'"),
        (("--since", "2027-03-16", "--until", "2027-03-15"), "is not after --since"),
    ]:
        bad = cli(*args)
        assert bad.exit_code == 1 and message in bad.output, (args, bad.output)


def test_the_temporary_prefect_server_batches_its_writes_unless_told_otherwise(monkeypatch):
    from prefect.settings import Settings

    from relance.cli import TEMPORARY_SERVER_DEFAULTS, _temporary_server_defaults

    for name in TEMPORARY_SERVER_DEFAULTS:
        monkeypatch.delenv(name, raising=False)  # and whatever the call sets is undone at teardown
    monkeypatch.setenv("PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL", "3")  # the user's own
    _temporary_server_defaults()
    services = Settings().server.services  # read by Prefect itself: a misspelt name would be ignored
    assert services.task_run_recorder.batch_size == 100 and services.event_persister.batch_size == 500
    assert services.task_run_recorder.flush_interval == 1 and services.event_persister.flush_interval == 3
