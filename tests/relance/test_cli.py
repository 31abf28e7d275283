"""The `relance` command on the example workspace, as an SDR would use it."""

from __future__ import annotations

import json
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
