"""Every email the example workspace can send scores clean under SpamAssassin's local rules.

The workspace is the one `relance init` writes. Every email step of every example cadence is
rendered with every A/B variant (follow-ups once per message of the thread they answer) for
a few sample prospects, exactly as dispatch does it (planning.step_templates, touch_context,
reply_subject, the Renderer, a signed unsubscribe token, email_message.build_email), and the
RFC 5322 bytes go through `spamassassin -L` (Debian package; `.ci/run` installs it).

One spamassassin process scores every message (its start-up, about a second, dominates);
each result is matched back to its message by the X-Relance-Touch header. A spammy control
message built the same way must score as spam, so a SpamAssassin without its rules cannot
pass the test by scoring everything 0.

The same messages are also checked for what French B2B prospecting needs in the body (CNIL):
plain text first, who writes (sender and company with its address), why the prospect is
contacted, and an opt-out sentence with its link.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.parser import BytesParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from relance.channels import OutboundTouch, Sender
from relance.cli import app
from relance.email_message import build_email, make_message_id
from relance.events import Channel
from relance.planning import pick_sender, reply_subject, step_templates, touch_context
from relance.prospects import normalise_row
from relance.tokens import UnsubscribeTokens
from relance.validate import SAMPLE_PROSPECTS
from relance.workspace import Workspace

# SpamAssassin flags spam at 5.0; a prospecting email must stay far below that.
THRESHOLD = 2.5
SPAMASSASSIN_TIMEOUT = 180
# Sample prospects of prospects/sample.csv (by email): accented French names, an English
# prospect in New York, a prospect with no title (template fallbacks).
SAMPLE_EMAILS = ("h.benard@heliodata.example", "daniel@kestrel-data.example", "a.gauthier@mont-royal-saas.example")
OPT_OUT_SENTENCES = {"fr": "Pour ne plus être contacté", "en": "To stop hearing from us"}
WHY_SENTENCES = {"fr": "Vous recevez ce message car", "en": "You are receiving this email because"}
CHECK_HEADER = "Relance-Check"  # SpamAssassin writes it as X-Spam-Relance-Check


@dataclass(frozen=True)
class Built:
    key: str  # the X-Relance-Touch header: unique per message
    label: str  # "cfo-outbound-fr/intro[a] for Hervé Bénard"
    language: str
    signature: str  # what the footer prints for the sender: their signature, else their name
    unsubscribe_url: str
    raw: bytes


def _prospects(ws: Workspace) -> list[dict]:
    """A few prospects as the store holds them (normalised like an import), with ids."""
    rows = {row["email"]: row for row in csv.DictReader((ws.root / "prospects" / "sample.csv").open(encoding="utf-8"))}
    out = [normalise_row(rows[email]) for email in SAMPLE_EMAILS]
    out.append(normalise_row({"email": "contact@durand-conseil.example", "last_name": "Durand"}))  # no first name, company, title
    out.append({k: v for k, v in SAMPLE_PROSPECTS["long"].items()})  # validate's long-names prospect
    return [dict(p, id=i) for i, p in enumerate(out, start=101)]


def example_emails(ws: Workspace, now: datetime) -> list[Built]:
    """Every email the example cadences can send, built as dispatch builds it."""
    tokens = UnsubscribeTokens("spamassassin-test-secret")
    base_url = ws.config.web.base_url.rstrip("/")
    built: list[Built] = []
    enrollment = 0
    for seq in ws.sequences.values():
        for prospect in _prospects(ws):
            enrollment += 1
            address = pick_sender(ws.config, seq.sender.pool, prospect.get("email") or str(prospect["id"]))
            box = ws.config.mailbox(address)
            sender = Sender(box.email, box.name, box.signature)
            sender_vars = {"name": sender.name, "email": sender.address, "signature": sender.signature}
            recipient_name = " ".join(p for p in (prospect.get("first_name"), prospect.get("last_name")) if p)
            sent: dict[str, list[tuple[str, str]]] = {}  # step id -> [(subject, message id)] of its messages
            for step in seq.steps:
                if step.email is None:
                    continue
                # A follow-up is built once per message of the thread it answers (one per intro variant).
                parents = sent[step.email.reply_to] if step.email.reply_to else [(None, None)]
                for variant in step.email.variants or [None]:
                    for n, (parent_subject, parent_id) in enumerate(parents):
                        template, subject_override = step_templates(step, variant)
                        unsubscribe_url = f"{base_url}/u/{tokens.make(prospect['id'], enrollment)}"
                        context = touch_context(ws.config, seq, step, prospect, sender_vars, unsubscribe_url)
                        rendered = ws.renderer.render(template, context, subject_override)
                        subject = rendered.subject or reply_subject(parent_subject)
                        assert subject, f"{seq.name}/{step.id}: no subject"
                        suffix = f"[{variant.id}]" if variant else (f"[thread {n + 1}]" if len(parents) > 1 else "")
                        key = f"{enrollment}:{step.id}{suffix}"
                        message_id = make_message_id(sender.address, key)
                        touch = OutboundTouch(
                            touch_id=len(built) + 1,
                            idempotency_key=key,
                            channel=Channel.email,
                            action="send",
                            recipient=prospect["email"],
                            recipient_name=recipient_name,
                            sender=sender,
                            subject=subject,
                            body=rendered.body,
                            message_id=message_id,
                            in_reply_to=parent_id,
                            references=(parent_id,) if parent_id else (),
                            unsubscribe_url=unsubscribe_url,
                            unsubscribe_mailto=f"mailto:{sender.address}?subject=unsubscribe",
                            metadata={"date": now},
                        )
                        raw = build_email(touch, date=now).as_bytes()
                        label = f"{seq.name}/{step.id}{suffix} for {recipient_name}"
                        built.append(Built(key, label, seq.language or "fr", sender.signature or sender.name, unsubscribe_url, raw))
                        sent.setdefault(step.id, []).append((subject, message_id))
    return built


def spammy_control(now: datetime) -> Built:
    """Built by the same code: proves SpamAssassin's rules are loaded and firing."""
    key = "control:spam"
    touch = OutboundTouch(
        touch_id=0,
        idempotency_key=key,
        channel=Channel.email,
        action="send",
        recipient="you@example.com",
        recipient_name="Friend",
        sender=Sender("winner@lottery.example", "WINNER"),
        subject="FREE MONEY!!! CLAIM YOUR PRIZE NOW!!!",
        body=(
            "Dear Friend,\n\nYou have been selected to receive $1,000,000 USD!!! Click here to claim your prize,\n"
            "100% FREE, no obligation, act now, limited time offer! Cheap viagra and cialis.\n"
            "Double your income working from home. Guaranteed! Risk free! Order now!\n"
            "To be removed from our mailing list reply with REMOVE in the subject.\n"
        ),
        message_id=make_message_id("winner@lottery.example", key),
    )
    return Built(key, "spammy control message", "en", "WINNER", "", build_email(touch, date=now).as_bytes())


@dataclass(frozen=True)
class Score:
    score: float
    rules: dict[str, float]

    def hits(self) -> str:
        return ", ".join(f"{name}={points:g}" for name, points in sorted(self.rules.items(), key=lambda r: -r[1])) or "none"


_CHECK = re.compile(rf"^X-Spam-{CHECK_HEADER}:(?P<value>.*(?:\r?\n[ \t].*)*)", re.MULTILINE)
_VALUE = re.compile(r"key=(?P<key>.*?)\s+score=(?P<score>-?[\d.]+)\s+tests=(?P<tests>\S*)")


def spamassassin(messages: list[Built], workdir: Path) -> dict[str, Score]:
    """Score every message with one `spamassassin -L` run; {X-Relance-Touch: Score}."""
    exe = shutil.which("spamassassin")
    if exe is None:
        pytest.fail(
            "spamassassin is not installed: this test needs SpamAssassin's local rules "
            "(Debian: apt-get install spamassassin; .ci/run installs it)",
            pytrace=False,
        )
    home = workdir / "home"  # SpamAssassin writes its user state under $HOME: keep it in the test's folder
    home.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, message in enumerate(messages):
        path = workdir / f"{i:04d}.eml"
        path.write_bytes(message.raw)
        paths.append(str(path))
    command = [
        exe,
        "-L",  # local tests only: no DNS blocklists, no network
        "-x",  # do not create user_prefs
        "--cf=use_bayes 0",  # an untrained Bayes database never scores; leave no state behind
        "--cf=use_auto_welcomelist 0",
        "--cf=report_safe 0",  # keep each message as it is, the result in headers
        f"--cf=add_header all {CHECK_HEADER} key=_HEADER(X-Relance-Touch)_ score=_SCORE_ tests=_TESTSSCORES(,)_",
        *paths,
    ]
    env = {**os.environ, "HOME": str(home), "LC_ALL": "C.UTF-8"}
    try:
        proc = subprocess.run(command, capture_output=True, env=env, timeout=SPAMASSASSIN_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"spamassassin did not finish {len(paths)} messages in {SPAMASSASSIN_TIMEOUT} s", pytrace=False)
    output = proc.stdout.decode("utf-8", "replace")
    if proc.returncode != 0:
        pytest.fail(f"spamassassin failed (exit {proc.returncode}):\n{proc.stderr.decode('utf-8', 'replace')[-3000:]}", pytrace=False)
    scores: dict[str, Score] = {}
    for match in _CHECK.finditer(output):
        value = " ".join(match.group("value").split())
        parsed = _VALUE.search(value)
        assert parsed, f"cannot read SpamAssassin's result header: {value!r}"
        rules = {}
        for item in filter(None, parsed.group("tests").split(",")):
            name, _, points = item.partition("=")
            rules[name] = float(points or 0)
        scores[parsed.group("key")] = Score(float(parsed.group("score")), rules)
    missing = [m.label for m in messages if m.key not in scores]
    assert not missing, f"spamassassin returned no score for: {missing}\nstderr:\n{proc.stderr.decode('utf-8', 'replace')[-3000:]}"
    return scores


@pytest.fixture(scope="module")
def example_ws(tmp_path_factory) -> Workspace:
    """The workspace `relance init` writes."""
    root = tmp_path_factory.mktemp("init") / "workspace"
    result = CliRunner().invoke(app, ["init", str(root)])
    assert result.exit_code == 0, result.output
    ws = Workspace.load(root)
    assert not ws.problems, [p.located() for p in ws.problems]
    return ws


@pytest.fixture(scope="module")
def emails(example_ws: Workspace) -> list[Built]:
    built = example_emails(example_ws, datetime.now(UTC).replace(microsecond=0))
    assert built
    return built


def test_every_example_email_step_and_variant_is_covered(example_ws: Workspace, emails: list[Built]):
    expected = set()
    for seq in example_ws.sequences.values():
        for step in seq.steps:
            if step.email:
                expected |= {f"{seq.name}/{step.id}[{v.id}]" for v in step.email.variants} or {f"{seq.name}/{step.id}"}
    labels = {e.label.split(" for ")[0].split("[thread")[0] for e in emails}
    assert expected <= labels, expected - labels
    assert len(example_ws.sequences) == 3 and len({e.key for e in emails}) == len(emails)


def test_example_emails_score_clean_under_spamassassin(emails: list[Built], tmp_path: Path):
    control = spammy_control(datetime.now(UTC).replace(microsecond=0))
    scores = spamassassin([*emails, control], tmp_path)

    report = "\n".join(f"{scores[e.key].score:5.1f}  {e.label}  [{scores[e.key].hits()}]" for e in emails)
    print(f"SpamAssassin {len(emails)} example emails (threshold {THRESHOLD}):\n{report}")
    assert scores[control.key].score >= 5.0, (
        f"the spammy control message scored {scores[control.key].score} ({scores[control.key].hits()}): "
        "SpamAssassin's rules do not seem to be loaded, so the scores below prove nothing\n" + report
    )
    too_high = [f"{scores[e.key].score:.1f}  {e.label}: {scores[e.key].hits()}" for e in emails if scores[e.key].score > THRESHOLD]
    assert not too_high, f"example emails above {THRESHOLD} under spamassassin -L (rule=points):\n" + "\n".join(too_high)


def test_example_emails_carry_identity_and_opt_out_in_plain_text(example_ws: Workspace, emails: list[Built]):
    """CNIL (B2B prospecting): who writes, why, and how to object, in the body of every email."""
    company = example_ws.config.company
    problems = []
    for e in emails:
        msg = BytesParser(policy=policy.default).parsebytes(e.raw)
        first = next(p for p in msg.walk() if not p.is_multipart())
        if first.get_content_type() != "text/plain":
            problems.append(f"{e.label}: first part is {first.get_content_type()}, not text/plain")
            continue
        body = first.get_content().replace("\r\n", "\n")  # CRLF on the wire
        for what, needle in (
            ("sender's signature", e.signature),
            ("company name", company.name),
            ("company address", company.address),
            ("reason for writing", WHY_SENTENCES[e.language]),
            ("opt-out sentence", OPT_OUT_SENTENCES[e.language]),
            ("opt-out link", e.unsubscribe_url),
        ):
            if needle not in body:
                problems.append(f"{e.label}: body lacks the {what} ({needle!r})")
        if e.unsubscribe_url not in (msg["List-Unsubscribe"] or "") or msg["List-Unsubscribe-Post"] != "List-Unsubscribe=One-Click":
            problems.append(f"{e.label}: List-Unsubscribe / List-Unsubscribe-Post missing or without the signed link")
    assert not problems, "\n".join(problems)
