"""The renderer's knowledge of what a template reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from relance.rendering import Renderer


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("Voir {{ unsubscribe_url }}", True),
        ("{% if unsubscribe_url %}lien{% endif %}", True),
        ("Bonjour {{ prospect.first_name }}", False),
        ("{% set unsubscribe_url = 'x' %}{{ unsubscribe_url }}", False),  # its own variable, not the context's
        ("{% include '_footer.j2' %}", True),  # the included file might read it
        ("{% import '_macros.j2' as m %}{{ m.x() }}", True),
        ("{% if %}", True),  # broken: render() reports it, so nothing is left out on a guess
    ],
)
def test_uses_tells_whether_a_template_may_read_a_variable(tmp_path: Path, source: str, expected: bool):
    (tmp_path / "t.j2").write_text(source)
    assert Renderer(tmp_path).uses("t.j2", "unsubscribe_url") is expected


def test_uses_of_a_missing_template_is_true(tmp_path: Path):
    assert Renderer(tmp_path).uses("missing.j2", "unsubscribe_url") is True
