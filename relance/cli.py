"""The `relance` command.

Every command works on a workspace (a folder with config.yaml; `-w` or the current folder)
and takes `--at` to run on a simulated clock (the demo, previews, tests). Prefect, the
web app and the scheduler are imported only by the commands that use them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from relance.errors import RelanceError, UserInputError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # a user error is one line (main); a bug keeps its plain traceback
    help="Relance: code-first multichannel prospecting cadences.",
)
tasks_app = typer.Typer(no_args_is_help=False, help="The SDR's task inbox (manual calls, LinkedIn actions, tasks).")
app.add_typer(tasks_app, name="tasks")
console = Console()
err = Console(stderr=True)

WorkspaceOpt = Annotated[Path, typer.Option("--workspace", "-w", help="Workspace folder (has config.yaml).", envvar="RELANCE_WORKSPACE")]
AtOpt = Annotated[Optional[str], typer.Option("--at", help="Simulated current time, ISO 8601 (UTC if no offset).", envvar="RELANCE_NOW")]


def _now(at: str | None) -> datetime:
    if not at:
        return datetime.now(UTC)
    try:
        value = datetime.fromisoformat(at.replace("Z", "+00:00"))
    except ValueError:
        raise UserInputError(f"cannot read time {at!r}: use ISO 8601, e.g. 2027-03-15T08:00:00Z", key="--at") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _workspace(path: Path):
    from relance.workspace import Workspace

    ws = Workspace.load(path)
    for problem in ws.problems:
        err.print(f"[yellow]warning[/]: {problem.located()} (this cadence is not loaded; run `relance validate`)")
    return ws


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error[/]: {message}")
    raise typer.Exit(code)


# ------------------------------------------------------------------------ workspace
@app.command()
def init(target: Annotated[Path, typer.Argument(help="Folder to create.")] = Path(".")) -> None:
    """Write the example workspace (config.yaml, sequences, templates, sample prospects)."""
    source = Path(__file__).resolve().parent.parent
    if not (source / "config.yaml").exists():
        _fail(f"the example workspace is not next to the installed package ({source}); install Relance from its repository")
    target.mkdir(parents=True, exist_ok=True)
    if (target / "config.yaml").exists():
        _fail(f"{target / 'config.yaml'} exists already: not overwriting a workspace")
    shutil.copy2(source / "config.yaml", target / "config.yaml")
    for folder in ("sequences", "templates", "prospects"):
        shutil.copytree(source / folder, target / folder, dirs_exist_ok=True)
    console.print(f"Workspace written to [bold]{target}[/]. Next: relance validate, relance import prospects/sample.csv")


@app.command()
def validate(
    paths: Annotated[Optional[list[Path]], typer.Argument(help="Cadence files or folders (default: all).")] = None,
    workspace: WorkspaceOpt = Path("."),
) -> None:
    """Check cadences, templates and references before anything is sent."""
    from relance.validate import format_problems, validate_workspace

    problems = validate_workspace(workspace, [p.resolve() for p in paths] if paths else None)
    if problems:
        err.print(format_problems(problems))
        err.print(f"[red]{len(problems)} problem(s)[/]")
        raise typer.Exit(1)
    console.print("[green]ok[/]: every cadence and template is valid")


@app.command()
def schema() -> None:
    """Print the JSON Schema of a cadence file (for editor autocompletion)."""
    from relance.spec import json_schema

    print(json.dumps(json_schema(), indent=2, ensure_ascii=False))


# ------------------------------------------------------------------------ prospects
@app.command("import")
def import_(
    csv_file: Annotated[Path, typer.Argument(help="Prospect CSV (English or French headers, , or ; separated).")],
    workspace: WorkspaceOpt = Path("."),
    at: AtOpt = None,
) -> None:
    """Validate, normalise and import prospects; rejected rows are listed with their line."""
    from relance.prospects import import_csv

    ws = _workspace(workspace)
    now = _now(at)
    path = csv_file if csv_file.is_absolute() else Path.cwd() / csv_file
    with open(path, "rb") as handle:
        total_lines = max(sum(1 for _ in handle) - 1, 0)
    with Progress(TextColumn("importing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True) as bar:
        job = bar.add_task("import", total=total_lines)
        report = import_csv(
            ws.store, path, now=now, default_country=ws.config.country, default_timezone=ws.config.timezone,
            progress=lambda n: bar.update(job, completed=n), workers=None,
        )
    console.print(
        f"{path.name}: [green]{report.imported} imported[/], {report.updated} updated, "
        f"{report.duplicates} duplicate(s) in the file, [red]{len(report.rejected)} rejected[/]"
    )
    if report.rejected:
        table = Table("line", "column", "reason", title="Rejected rows", title_justify="left")
        for r in report.rejected:
            table.add_row(str(r.row_number), r.column or "", r.reason)
        console.print(table)


@app.command()
def enroll(
    sequence: Annotated[str, typer.Argument(help="Sequence name.")],
    where: Annotated[Optional[list[str]], typer.Option("--where", help="Field filter FIELD=VALUE (repeatable), e.g. country=FR.")] = None,
    email: Annotated[Optional[list[str]], typer.Option("--email", help="Enroll these prospects (repeatable).")] = None,
    from_file: Annotated[Optional[Path], typer.Option("--file", help="A text file of emails, one a line.")] = None,
    workspace: WorkspaceOpt = Path("."),
    at: AtOpt = None,
) -> None:
    """Enroll prospects; suppressed and busy prospects are refused and counted by reason."""
    from relance.enrollment import enroll as enroll_prospects
    from relance.prospects import find_prospects

    ws = _workspace(workspace)
    seq = ws.sequence(sequence)
    filters = {}
    for item in where or []:
        key, sep, value = item.partition("=")
        if not sep:
            _fail(f"--where {item!r}: write FIELD=VALUE")
        filters[key.strip()] = value.strip()
    emails = list(email or [])
    if from_file:
        emails += [line.strip() for line in from_file.read_text().splitlines() if line.strip()]
    with ws.store.connect() as conn:
        ids = find_prospects(conn, emails=emails or None, where=filters or None)
    report = enroll_prospects(ws, seq, ids, _now(at))
    console.print(f"{sequence}: [green]{report.enrolled} enrolled[/], {report.total_skipped} skipped")
    for reason, count in report.skipped.most_common():
        console.print(f"  skipped {count}: {reason}")


@app.command()
def erase(
    email: Annotated[str, typer.Argument(help="The prospect's email address.")],
    workspace: WorkspaceOpt = Path("."),
    at: AtOpt = None,
) -> None:
    """Erase a prospect's personal data (GDPR); reports stay correct, re-imports are refused."""
    from relance.privacy import erase_prospect
    from relance.prospects import find_prospects

    ws = _workspace(workspace)
    now = _now(at)
    with ws.store.begin() as conn:
        ids = find_prospects(conn, emails=[email])
        if not ids:
            _fail(f"no prospect with email {email}")
        for pid in ids:
            erase_prospect(conn, pid, now)  # ends their cadences; events stay, blanked, for the reports
    console.print(f"erased {email}")


@app.command()
def retention(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count who would be blanked, change nothing.")] = False,
    workspace: WorkspaceOpt = Path("."),
    at: AtOpt = None,
) -> None:
    """Blank the personal data of prospects idle for privacy.retention_days (the nightly
    retention flow does it too); unlike an erasure, a later re-import is allowed."""
    from relance.privacy import expire_idle_prospects

    ws = _workspace(workspace)
    days = ws.config.privacy.retention_days
    if days is None:
        _fail("privacy.retention_days is not set in config.yaml: personal data is kept")
    console.print(str(expire_idle_prospects(ws.store, _now(at), days, dry_run=dry_run)))


@app.command()
def suppress(
    value: Annotated[str, typer.Argument(help="An email address, a domain, a phone number or a LinkedIn URL.")],
    kind: Annotated[str, typer.Option(help="email, domain, phone or linkedin.")] = "email",
    reason: Annotated[str, typer.Option(help="Why, kept for audits.")] = "asked not to be contacted",
    workspace: WorkspaceOpt = Path("."),
    at: AtOpt = None,
) -> None:
    """Never contact this address again (or anyone at this domain, with --kind domain); every
    cadence it is in ends before its next touch, and no re-import undoes it."""
    from relance.suppression import WEBMAIL_DOMAINS, normalise_value, suppress as add_suppression

    if kind not in ("email", "domain", "phone", "linkedin"):
        _fail(f"--kind {kind!r}: use email, domain, phone or linkedin")
    try:
        normalised = normalise_value(kind, value)
    except ValueError as exc:
        _fail(f"{value!r}: {exc}")
    if kind == "domain" and normalised in WEBMAIL_DOMAINS:
        _fail(f"{normalised} is a webmail shared by millions: suppress the address instead")
    ws = _workspace(workspace)
    with ws.store.begin() as conn:
        added = add_suppression(conn, kind, normalised, reason, source="cli", now=_now(at))
    console.print(f"{'suppressed' if added else 'already suppressed'}: {kind} {normalised}")


# ------------------------------------------------------------------------ running
# Settings for the temporary Prefect server the flow commands start when no server is
# configured (PREFECT_API_URL); each is only a default, the environment wins.
#
# Its first start migrates a database, which takes more than Prefect's default 20 s on a
# busy 2-core machine. And its SQLite database has one writer: with the task-run recorder
# writing each task run's every state change in a transaction of its own, and the event
# persister every 20 events, the flow runs' own API calls met "database is locked" (503,
# then two seconds of client back-off) about every other tick of the simulated clock,
# which then spent half its time waiting, and the recorder was cut off mid-write when the
# process exited (tracebacks on the console). Batched, each writes about once a second.
BATCHED_SERVER_WRITES = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE": "500",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "1",
}
TEMPORARY_SERVER_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
    **BATCHED_SERVER_WRITES,
}


def _temporary_server_defaults() -> None:
    """Only defaults: the environment wins."""
    for name, value in TEMPORARY_SERVER_DEFAULTS.items():
        os.environ.setdefault(name, value)


@app.command()
def run(workspace: WorkspaceOpt = Path("."), at: AtOpt = None) -> None:
    """One tick now: the tick flow ingests responses, then dispatches what is due."""
    _temporary_server_defaults()
    from flows._common import call_flow
    from flows.tick import tick

    console.print_json(data=call_flow(tick, workspace=str(workspace.resolve()), now=_now(at)))


@app.command()
def simulate(
    weeks: Annotated[float, typer.Option(help="How many simulated weeks to run.")] = 6.0,
    step_minutes: Annotated[int, typer.Option(help="Dispatch granularity: the simulated scheduler's interval.")] = 30,
    close_tasks: Annotated[bool, typer.Option(help="Let a simulated SDR close manual tasks.")] = True,
    workspace: WorkspaceOpt = Path("."),
    at: AtOpt = None,
) -> None:
    """Run the tick flow (ingest, then dispatch) on a simulated clock, jumping over idle time."""
    _temporary_server_defaults()
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows._common import api_client_context, call_flow
    from flows.tick import tick
    from relance.simulation import Simulation

    ws = _workspace(workspace)
    start = _now(at)
    sim = Simulation(ws, start, start + timedelta(weeks=weeks), timedelta(minutes=step_minutes), close_tasks=close_tasks)
    path = str(workspace.resolve())
    # Heartbeats guard long real runs against crashes; each costs up to a second at flow exit.
    # One Prefect API client for every tick.
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}), api_client_context():
        with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=err) as bar:
            job = bar.add_task("simulating", total=sim.span_seconds)
            for now in sim.ticks():
                sim.record(now, call_flow(tick, workspace=path, now=now)["dispatch"])
                bar.update(job, completed=(now - start).total_seconds(), description=f"simulated {now:%a %d %b %H:%M} UTC")
    console.print(
        f"simulated {weeks:g} week(s) in {sim.tick_count} ticks: sent "
        + ", ".join(f"{count} {channel}" for channel, count in sorted(sim.sent.items()))
        + f"; {sim.tasks_created} manual tasks created, {sim.tasks_closed} closed by the simulated SDR"
    )


@app.command()
def serve(
    workspace: WorkspaceOpt = Path("."),
    web: Annotated[bool, typer.Option(help="Also serve the web app (opt-out page, webhooks, task inbox).")] = True,
) -> None:
    """Single-machine mode: APScheduler fires the flows on their schedules, next to the web app."""
    _temporary_server_defaults()
    from relance.serve import serve as run_server

    run_server(workspace.resolve(), with_web=web)


@app.command("web")
def web_(workspace: WorkspaceOpt = Path(".")) -> None:
    """Serve only the web app."""
    import uvicorn

    from relance.web import create_app

    ws = _workspace(workspace)
    uvicorn.run(create_app(ws), host=ws.config.web.host, port=ws.config.web.port)


# ------------------------------------------------------------------------ reading
@app.command()
def report(
    view: Annotated[
        str,
        typer.Option(
            help="funnel: per-channel results grouped --by a dimension; deliverability: email delivered, "
            "bounces (hard, soft), complaints, opt-outs, auto-replies and replies per mailbox and per sequence."
        ),
    ] = "funnel",
    sequence: Annotated[Optional[str], typer.Option(help="Only this sequence.")] = None,
    since: Annotated[Optional[str], typer.Option(help="Only events at or after this time (ISO 8601).")] = None,
    until: Annotated[Optional[str], typer.Option(help="Only events before this time (ISO 8601).")] = None,
    by: Annotated[Optional[str], typer.Option(help="funnel view: channel (default), step, sequence, variant or sender.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, csv, json or markdown.")] = "table",
    workspace: WorkspaceOpt = Path("."),
) -> None:
    """Results computed in SQL over the event log: the per-channel funnel, or email deliverability."""
    from relance.reports import build_report, deliverability_report

    if view not in ("funnel", "deliverability"):
        _fail(f"--view {view!r}: use funnel or deliverability")
    if by is not None and by not in ("channel", "step", "sequence", "variant", "sender"):
        _fail(f"--by {by!r}: use channel, step, sequence, variant or sender")
    if view == "deliverability" and by is not None:
        _fail("--by applies to the funnel view; the deliverability view is always per mailbox and per sequence")
    if fmt not in ("table", "csv", "json", "markdown"):
        _fail(f"--format {fmt!r}: use table, csv, json or markdown")
    start, end = (_now(since) if since else None), (_now(until) if until else None)
    if start and end and end <= start:
        _fail(f"--until {until} is not after --since {since}")
    ws = _workspace(workspace)
    with ws.store.connect() as conn:
        if view == "deliverability":
            result = deliverability_report(conn, since=start, until=end, sequence=sequence)
        else:
            result = build_report(conn, by=by or "channel", sequence=sequence, since=start, until=end)
    if fmt == "json":
        print(result.to_json())
    elif fmt == "csv":
        sys.stdout.write(result.to_csv())
    elif fmt == "markdown":
        print(result.to_markdown())
    else:
        for table in result.to_rich_tables():
            console.print(table)


@app.command()
def preview(
    sequence: Annotated[str, typer.Argument(help="Sequence name.")],
    prospect: Annotated[str, typer.Option("--prospect", help="The prospect's email.")],
    assume: Annotated[Optional[list[str]], typer.Option(help="Pretend an event happened: KIND:STEP, e.g. accepted:invite.")] = None,
    workspace: WorkspaceOpt = Path("."),
    at: AtOpt = None,
) -> None:
    """The prospect's exact timeline through the cadence, in their local time, rendered."""
    from relance.enrollment import PROSPECT_COLUMNS
    from relance.preview import timeline
    from relance.store import prospects
    from sqlalchemy import select

    ws = _workspace(workspace)
    seq = ws.sequence(sequence)
    with ws.store.connect() as conn:
        row = conn.execute(select(*PROSPECT_COLUMNS).where(prospects.c.email == prospect.strip().lower())).first()
    if row is None:
        _fail(f"no prospect with email {prospect}: import it first")
    events = [tuple(a.split(":", 1)) if ":" in a else (a, None) for a in assume or []]
    for touch in timeline(ws, seq, dict(row._mapping), _now(at), events):
        head = f"[bold]{touch.at_local:%a %d %b %Y %H:%M %Z}[/]  {touch.step_id}  {touch.channel}/{touch.action}"
        if touch.variant:
            head += f"  variant {touch.variant}"
        console.print(head)
        if touch.skipped:
            console.print(f"  [dim]skipped ({touch.skipped})[/]\n")
            continue
        if touch.subject:
            console.print(f"  Subject: {touch.subject}", markup=False)
        for line in touch.body.splitlines():
            console.print(f"  | {line}", markup=False, highlight=False)
        console.print()


@app.command("status")
def status_(workspace: WorkspaceOpt = Path("."), at: AtOpt = None) -> None:
    """Enrollments by state, touches by status, and what is stuck and why."""
    from relance.status import status

    ws = _workspace(workspace)
    info = status(ws, _now(at))
    console.print(f"enrollments: {info['enrollments']}")
    console.print(f"touches: {info['touches']}")
    console.print(f"due now: {info['due_now']}, open tasks: {info['open_tasks']}")
    if info["paused"]:
        table = Table("enrollment", "sequence", "next step", "reason", title="Paused (need a person)", title_justify="left")
        for r in info["paused"]:
            table.add_row(str(r["id"]), r["sequence"], r["next_step_id"] or "", r["reason"] or "")
        console.print(table)
    if info["problems"]:
        table = Table("touch", "sequence", "step", "status", "error", title="Failed, retrying or unknown touches", title_justify="left")
        for r in info["problems"]:
            table.add_row(str(r["id"]), r["sequence"], r["step_id"], r["status"], r["error"] or "")
        console.print(table)


@tasks_app.callback(invoke_without_command=True)
def tasks_list(
    ctx: typer.Context,
    owner: Annotated[Optional[str], typer.Option(help="Only this owner's tasks.")] = None,
    workspace: WorkspaceOpt = Path("."),
    at: AtOpt = None,
) -> None:
    """List due tasks with the rendered call script or LinkedIn note."""
    if ctx.invoked_subcommand is not None:
        return
    from relance.inbox import open_tasks

    ws = _workspace(workspace)
    rows = open_tasks(ws, _now(at), owner)
    if not rows:
        console.print("no open task")
    for t in rows:
        who = " ".join(p for p in (t["first_name"], t["last_name"]) if p)
        contact = t["phone"] if t["channel"] == "call" else t["linkedin_url"] if t["channel"] == "linkedin" else ""
        console.print(f"[bold]#{t['id']}[/] {t['channel']}/{t['action']}: {t['title']}  ({who}, {t['company'] or ''}) {contact or ''}", markup=True)
        for line in (t["body"] or "").splitlines():
            console.print(f"    {line}", markup=False, highlight=False)


@tasks_app.command("done")
def tasks_done(
    task_id: Annotated[int, typer.Argument(help="Task number.")],
    outcome: Annotated[str, typer.Option(help="connected, voicemail, no_answer, wrong_number, meeting_booked, accepted, replied, qualified, disqualified, done, skipped.")] = "done",
    note: Annotated[Optional[str], typer.Option(help="Free text kept with the event.")] = None,
    workspace: WorkspaceOpt = Path("."),
    at: AtOpt = None,
) -> None:
    """Close a task with its outcome; conditions and exits see it at once."""
    from relance.inbox import complete_task

    ws = _workspace(workspace)
    kind = complete_task(ws, task_id, outcome, _now(at), note)
    console.print(f"task {task_id}: recorded {kind.value}")


@app.command()
def resume(
    enrollment_id: Annotated[int, typer.Argument(help="A paused enrollment.")],
    workspace: WorkspaceOpt = Path("."),
    at: AtOpt = None,
) -> None:
    """Resume a paused enrollment after its problem was fixed (template, sender, reconciliation)."""
    from relance.store import enrollments
    from sqlalchemy import update

    ws = _workspace(workspace)
    now = _now(at)
    with ws.store.begin() as conn:
        done = conn.execute(
            update(enrollments)
            .where(enrollments.c.id == enrollment_id, enrollments.c.state == "paused")
            .values(state="active", reason=None, next_due_at=now, updated_at=now)
        ).rowcount
    if not done:
        _fail(f"enrollment {enrollment_id} is not paused")
    console.print(f"enrollment {enrollment_id} resumed")


def main() -> None:
    try:
        app()
    except RelanceError as exc:
        err.print(f"[red]error[/]: {exc}", markup=True, highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
