"""`relance validate` finds every problem, each at its file, line and key."""

from __future__ import annotations

import textwrap
from datetime import date
from pathlib import Path

import pytest

from relance import validate as validate_module
from relance.errors import UserInputError
from relance.validate import SAMPLE_PROSPECTS, format_problems, validate_workspace

CONFIG = """\
country: FR
company:
  name: Acme Test SAS
  address: 1 rue du Test, 75001 Paris
senders:
  sales:
    - name: Sam Seller
      email: sam@acme.invalid
"""

INTRO = """\
Subject: Bonjour {{ prospect.first_name }}

Bonjour {{ prospect.first_name }},

Je travaille avec des DAF comme chez {{ prospect.company }}.
{% set signoff = "Cordialement" %}
{{ signoff }},
{{ sender.name }}, {{ company.name }}
Se désinscrire : {{ unsubscribe_url }}
"""

BUMP = """\
{{ prospect.first_name }}, un petit rappel.
{{ company.name }} - {{ unsubscribe_url }}
"""

INVITE = "Bonjour {{ prospect.first_name }}, ravi d'échanger avec vous.\n"

GOOD = """\
name: good
sender: {pool: sales}
steps:
  - id: intro
    email: {template: email/intro.j2}
  - id: invite
    wait: 1 business day
    linkedin: {action: invite, template: linkedin/invite.j2}
  - id: bump
    wait: 2 days
    when: "not opened('intro') and not accepted('invite')"
    email: {reply_to: intro, template: email/bump.j2}
"""


def write(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    write(tmp_path, "config.yaml", CONFIG)
    write(tmp_path, "templates/email/intro.j2", INTRO)
    write(tmp_path, "templates/email/bump.j2", BUMP)
    write(tmp_path, "templates/linkedin/invite.j2", INVITE)
    write(tmp_path, "sequences/good.yaml", GOOD)
    return tmp_path


def located(problems: list[UserInputError]) -> list[str]:
    return [p.located() for p in problems]


def only(problems: list[UserInputError], prefix: str) -> UserInputError:
    """The single problem whose located() starts with `prefix` (file:line:)."""
    hits = [p for p in problems if p.located().startswith(prefix)]
    assert len(hits) == 1, located(problems)
    return hits[0]


def test_a_good_workspace_has_no_problem(ws: Path) -> None:
    assert located(validate_workspace(ws)) == []


def test_malformed_yaml_is_located_and_other_files_still_validate(ws: Path) -> None:
    bad = write(ws, "sequences/bad.yaml", """\
        name: bad
        steps:
          - id: intro
             email: {template: email/intro.j2}
        """)
    problems = validate_workspace(ws)
    assert {p.file for p in problems} == {str(bad)}
    problem = only(problems, f"{bad}:4:")
    assert "invalid YAML" in problem.detail


def test_unknown_key(ws: Path) -> None:
    path = write(ws, "sequences/typo.yaml", """\
        name: typo
        sender: {pool: sales}
        steps:
          - id: intro
            emial: {template: email/intro.j2}
        """)
    problems = validate_workspace(ws)
    assert only(problems, f"{path}:5: steps.0.emial:")


def test_duplicate_step_id(ws: Path) -> None:
    path = write(ws, "sequences/dup.yaml", """\
        name: dup
        sender: {pool: sales}
        steps:
          - id: intro
            email: {template: email/intro.j2}
          - id: intro
            email: {template: email/intro.j2}
        """)
    problem = only(validate_workspace(ws), f"{path}:6: steps.1.id:")
    assert "duplicate step id 'intro'" in problem.detail


@pytest.mark.parametrize("target", ["later", "nowhere"])
def test_reply_to_a_later_or_missing_step(ws: Path, target: str) -> None:
    path = write(ws, "sequences/reply.yaml", f"""\
        name: reply
        sender: {{pool: sales}}
        steps:
          - id: first
            email:
              template: email/intro.j2
              reply_to: {target}
          - id: later
            email: {{template: email/intro.j2}}
        """)
    problem = only(validate_workspace(ws), f"{path}:7: steps.0.email.reply_to:")
    assert "not an earlier email step" in problem.detail


def test_unknown_sender_pool(ws: Path) -> None:
    path = write(ws, "sequences/pool.yaml", """\
        name: pool
        sender:
          pool: marketing
        steps:
          - id: intro
            email: {template: email/intro.j2}
        """)
    problem = only(validate_workspace(ws), f"{path}:3: sender.pool:")
    assert "unknown sender pool 'marketing' (known: sales)" in problem.detail


def test_on_exit_to_a_missing_sequence(ws: Path) -> None:
    path = write(ws, "sequences/exit.yaml", """\
        name: exit
        steps:
          - id: visit
            linkedin: {action: visit}
        on_exit:
          disqualified: {enroll: nurture}
          replied: {enroll: good}
        """)
    problems = validate_workspace(ws)
    problem = only(problems, f"{path}:6: on_exit.disqualified.enroll:")
    assert "no sequence named 'nurture'" in problem.detail
    assert not [p for p in problems if p.line == 7]


def test_unknown_prospect_field_in_a_template(ws: Path) -> None:
    template = write(ws, "templates/email/colour.j2", """\
        Subject: Hello

        Hi {{ prospect.first_name }},
        I love {{ prospect.favourite_colour }} too.
        {{ company.name }} {{ unsubscribe_url }} {{ mystery }}
        """)
    write(ws, "sequences/colour.yaml", """\
        name: colour
        sender: {pool: sales}
        steps:
          - id: hello
            email: {template: email/colour.j2}
        """)
    problems = validate_workspace(ws)
    field = only(problems, f"{template}:4: prospect.favourite_colour:")
    assert "prospect has no field 'favourite_colour'" in field.detail
    assert "step 'hello' at sequences/colour.yaml:5" in field.detail
    assert "unknown variable 'mystery'" in only(problems, f"{template}:5: mystery:").detail
    # The template is reported once, at the template; rendering it would only repeat that.
    assert len(problems) == 2, located(problems)


def test_template_syntax_error_with_its_line(ws: Path) -> None:
    template = write(ws, "templates/email/broken.j2", """\
        Subject: Hello

        Hi {{ prospect.first_name }},
        {% if prospect.company %}
        A word about {{ prospect.company }.
        {% endif %}
        """)
    write(ws, "sequences/broken.yaml", """\
        name: broken
        sender: {pool: sales}
        steps:
          - id: intro
            email: {template: email/intro.j2}
          - id: hello
            email: {template: email/broken.j2}
        """)
    problems = validate_workspace(ws)
    problem = only(problems, f"{template}:5:")
    assert problem.file == str(template)
    assert "invalid template syntax" in problem.detail
    assert "step 'hello' at sequences/broken.yaml:7" in problem.detail
    assert len(problems) == 1, located(problems)


def test_missing_template(ws: Path) -> None:
    path = write(ws, "sequences/missing.yaml", """\
        name: missing
        sender: {pool: sales}
        steps:
          - id: intro
            email:
              template: email/nope.j2
        """)
    problem = only(validate_workspace(ws), f"{path}:6: steps.0.email.template:")
    assert "template 'email/nope.j2' not found in templates/" in problem.detail


def test_missing_included_template(ws: Path) -> None:
    template = write(ws, "templates/email/with-footer.j2", """\
        Subject: Hi
        {{ company.name }} {{ unsubscribe_url }}
        {% include "email/footer.j2" %}
        """)
    write(ws, "sequences/footer.yaml", """\
        name: footer
        sender: {pool: sales}
        steps:
          - id: intro
            email: {template: email/with-footer.j2}
        """)
    problem = only(validate_workspace(ws), f"{template}:3:")
    assert "template 'email/footer.j2' not found" in problem.detail


def test_included_template_is_checked_at_its_own_lines(ws: Path) -> None:
    write(ws, "templates/email/with-footer.j2", """\
        Subject: Hi
        {% set who = company.name %}
        {% include "email/footer.j2" %}
        """)
    footer = write(ws, "templates/email/footer.j2", """\
        {{ who }} {{ unsubscribe_url }}
        {{ prospect.shoe_size }}
        """)
    write(ws, "sequences/footer.yaml", """\
        name: footer
        sender: {pool: sales}
        steps:
          - id: intro
            email: {template: email/with-footer.j2}
        """)
    problems = validate_workspace(ws)
    problem = only(problems, f"{footer}:2: prospect.shoe_size:")
    assert "included from email/with-footer.j2:3" in problem.detail
    assert len(problems) == 1, located(problems)


def test_linkedin_note_over_the_limit_with_the_long_prospect(ws: Path) -> None:
    # Fits with the normal prospect, not with the long one.
    filler = "x" * (300 - 60 - 20)
    write(ws, "templates/linkedin/long.j2", "{{ prospect.company }} {{ prospect.first_name }} " + filler + "\n")
    path = write(ws, "sequences/note.yaml", """\
        name: note
        steps:
          - id: visit
            linkedin: {action: visit}
          - id: invite
            linkedin: {action: invite, template: linkedin/long.j2}
        """)
    length = len(f"{SAMPLE_PROSPECTS['long']['company']} {SAMPLE_PROSPECTS['long']['first_name']} {filler}")
    normal = len(f"{SAMPLE_PROSPECTS['normal']['company']} {SAMPLE_PROSPECTS['normal']['first_name']} {filler}")
    assert normal <= 300 < length
    problem = only(validate_workspace(ws), f"{path}:6: steps.1.linkedin.template:")
    assert problem.detail.startswith(f"LinkedIn note is {length} characters, the limit is 300")


def test_email_without_opt_out_link_company_or_subject(ws: Path) -> None:
    write(ws, "templates/email/bare.j2", "Hi {{ prospect.first_name }}, {{ sender.name }}\n")
    path = write(ws, "sequences/bare.yaml", """\
        name: bare
        sender: {pool: sales}
        steps:
          - id: intro
            email:
              template: email/bare.j2
        """)
    problems = validate_workspace(ws)
    messages = sorted(p.detail.split(":")[0] for p in problems)
    assert messages == ["email does not name the sender's company", "email has no opt-out link", "email has no subject"]
    assert all(p.located().startswith(f"{path}:6: steps.0.email.template:") for p in problems)


def test_variants_are_rendered_with_their_own_subject(ws: Path) -> None:
    write(ws, "templates/email/nosubject.j2", "{{ company.name }} {{ unsubscribe_url }}\n")
    path = write(ws, "sequences/variants.yaml", """\
        name: variants
        sender: {pool: sales}
        steps:
          - id: intro
            email:
              template: email/nosubject.j2
              variants:
                - {id: a, subject: "Hello {{ prospect.first_name }}"}
                - {id: b}
                - {id: c, subject: "Hi {{ prospect.pet }}"}
        """)
    problems = validate_workspace(ws)
    assert "email has no subject" in only(problems, f"{path}:9: steps.0.email.variants.1:").detail
    assert "prospect has no field 'pet'" in only(problems, f"{path}:10: steps.0.email.variants.2.subject:").detail
    assert len(problems) == 2, located(problems)


def test_condition_with_unknown_step_and_unknown_function(ws: Path) -> None:
    path = write(ws, "sequences/cond.yaml", """\
        name: cond
        sender: {pool: sales}
        steps:
          - id: intro
            email: {template: email/intro.j2}
          - id: bump
            wait: 2 days
            when: "not opened('intor') and frobnicate() and replied('later') and favourite == 1"
            email: {template: email/intro.j2}
          - id: later
            email: {template: email/intro.j2}
        """)
    problems = validate_workspace(ws)
    details = [p.detail for p in problems]
    assert all(p.located().startswith(f"{path}:8: steps.1.when:") for p in problems), located(problems)
    assert any("opened('intor'): there is no step 'intor'" in d for d in details)
    assert any("unknown function frobnicate()" in d for d in details)
    assert any("replied('later'): step 'later' does not come before step 'bump'" in d for d in details)
    assert any("unknown name 'favourite'" in d for d in details)
    assert len(problems) == 4, located(problems)


def test_condition_on_an_event_the_step_cannot_produce(ws: Path) -> None:
    path = write(ws, "sequences/cond2.yaml", """\
        name: cond2
        steps:
          - id: visit
            linkedin: {action: visit}
          - id: call
            call: {script: email/bump.j2}
          - id: next
            when: "accepted('visit') or opened('call') or call_outcome('call') in ['voicemale', 'no_answer'] or prospect.shoe"
            linkedin: {action: visit}
        """)
    problems = validate_workspace(ws)
    assert all(p.located().startswith(f"{path}:8: steps.2.when:") for p in problems), located(problems)
    assert len(problems) == 4, located(problems)


def test_an_empty_window_is_reported(ws: Path) -> None:
    path = write(ws, "sequences/never.yaml", """\
        name: never
        schedule:
          window:
            days: []
            hours: ["09:00-12:00"]
        steps:
          - id: visit
            linkedin: {action: visit}
        """)
    problem = only(validate_workspace(ws), f"{path}:4: schedule.window.days:")
    assert "at least one day" in problem.detail


def test_an_equal_start_and_end_is_reported(ws: Path) -> None:
    path = write(ws, "sequences/never.yaml", """\
        name: never
        schedule:
          window: {days: mon-fri, hours: ["09:00-09:00"]}
        steps:
          - id: visit
            linkedin: {action: visit}
        """)
    assert only(validate_workspace(ws), f"{path}:3: schedule.window.hours:")


def test_a_window_closed_by_holidays_names_the_country(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validate_module, "OPENING_HORIZON_DAYS", 1)
    path = write(ws, "sequences/xmas.yaml", """\
        name: xmas
        schedule:
          holidays: prospect
          window: {days: [thu], hours: ["09:00-12:00"]}
        steps:
          - id: visit
            linkedin: {action: visit}
        """)
    problem = only(validate_workspace(ws, today=date(2025, 12, 25)), f"{path}:4: schedule.window:")
    assert "never opens" in problem.detail and "holidays of FR, used for 'holidays: prospect'" in problem.detail
    assert validate_workspace(ws, today=date(2025, 12, 18)) == []


def test_duplicate_sequence_names(ws: Path) -> None:
    path = write(ws, "sequences/zz-copy.yaml", GOOD)
    problem = only(validate_workspace(ws), f"{path}:1: name:")
    assert "also used by sequences/good.yaml" in problem.detail


def test_paths_limit_what_is_reported_but_references_still_resolve(ws: Path) -> None:
    write(ws, "sequences/bad.yaml", "name: bad\nsteps: [\n")
    path = write(ws, "sequences/exit.yaml", """\
        name: exit
        steps:
          - id: visit
            linkedin: {action: visit}
        on_exit:
          replied: {enroll: good}
        """)
    assert validate_workspace(ws, [path]) == []
    missing = ws / "sequences/nope.yaml"
    assert "no such file or directory" in only(validate_workspace(ws, [missing]), str(missing)).detail
    problems = validate_workspace(ws, [missing, ws / "sequences"])
    assert {p.file for p in problems} == {str(missing), str(ws / "sequences/bad.yaml")}


def test_a_broken_config_is_reported_and_cadences_are_still_checked(ws: Path) -> None:
    write(ws, "config.yaml", "company:\n  name: Acme\nsenders: {}\n")
    bad = write(ws, "sequences/bad.yaml", "name: bad\nsteps: []\n")
    problems = validate_workspace(ws)
    assert only(problems, f"{ws / 'config.yaml'}:1: company.address:")
    assert only(problems, f"{bad}:2: steps:")


def test_format_problems_is_relative_to_the_root(ws: Path) -> None:
    write(ws, "sequences/pool.yaml", "name: pool\nsender: {pool: nope}\nsteps:\n  - id: a\n    email: {template: email/intro.j2}\n")
    text = format_problems(validate_workspace(ws), root=ws)
    assert text == "sequences/pool.yaml:2: sender.pool: unknown sender pool 'nope' (known: sales)"
