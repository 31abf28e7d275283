"""Rendering touches: Jinja2's sandbox, StrictUndefined, prospect data as data only.

A template file may open with a `Subject: ...` line (itself a template), then a blank line,
then the body. Values are rendered, never compiled, so `{{ 7*7 }}` in a company name stays
those characters; CR/LF in a value cannot reach a header because subjects are folded onto
one line.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import FileSystemLoader, StrictUndefined, TemplateError, TemplateNotFound, TemplateSyntaxError, meta
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from relance.errors import RenderError

_SUBJECT_RE = re.compile(r"\ASubject:[ \t]*(?P<subject>[^\n]*)\n(?:[ \t]*\n)?", re.IGNORECASE)
_LINE_BREAKS = re.compile(r"[\r\n\t\v\f\u2028\u2029\x85]+")
LINKEDIN_NOTE_LIMIT = 300


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str | None
    body: str

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(f"{self.subject}\x00{self.body}".encode()).hexdigest()


def one_line(value: str) -> str:
    """Fold any line break into a space: header values must stay one line."""
    return _LINE_BREAKS.sub(" ", value).strip()


def _flat_globals(template: Any) -> Any:
    """Jinja keeps a template's globals as a ChainMap over the environment's and copies it
    into every render's context, key by key; a plain dict of the same names copies several
    times faster (the environment's globals never change after start-up)."""
    template.globals = dict(template.globals)
    return template


class Renderer:
    """Compiles each template once and renders it for many prospects."""

    def __init__(self, templates_dir: Path):
        self.templates_dir = templates_dir
        self.env = ImmutableSandboxedEnvironment(
            loader=FileSystemLoader(str(templates_dir)),
            undefined=StrictUndefined,
            autoescape=False,
            keep_trailing_newline=False,
            trim_blocks=True,
            lstrip_blocks=True,
            auto_reload=False,  # an {% include %} would stat its file on every render; a run's templates are fixed
        )
        self.env.filters["one_line"] = one_line
        self._split: dict[str, tuple[Any, Any]] = {}
        self._subjects: dict[str, Any] = {}
        self._uses: dict[tuple[str, str], bool] = {}

    def _compiled(self, name: str) -> tuple[Any, Any]:
        """(subject template or None, body template), from the file's source."""
        if name not in self._split:
            try:
                source, filename, _ = self.env.loader.get_source(self.env, name)
            except TemplateNotFound:
                raise RenderError(f"template {name!r} not found in {self.templates_dir}") from None
            match = _SUBJECT_RE.match(source)
            subject_src, body_src = (match.group("subject"), source[match.end():]) if match else (None, source)
            try:
                subject = _flat_globals(self.env.from_string(subject_src)) if subject_src is not None else None
                # Line numbers in errors count from the top of the file.
                offset = "\n" * (source[: match.end()].count("\n")) if match else ""
                body = _flat_globals(self.env.from_string(offset + body_src))
                body.filename = filename
            except TemplateSyntaxError as exc:
                raise RenderError(f"{name}:{exc.lineno}: {exc.message}") from None
            self._split[name] = (subject, body)
        return self._split[name]

    def render(self, name: str, context: Mapping[str, Any], subject_override: str | None = None) -> Rendered:
        subject_tpl, body_tpl = self._compiled(name)
        try:
            if subject_override is not None:
                subject: str | None = self._subject(subject_override).render(context)
            else:
                subject = subject_tpl.render(context) if subject_tpl is not None else None
            body = body_tpl.render(context).strip("\n") + "\n"
        except (TemplateError, SecurityError) as exc:
            raise RenderError(f"{name}: {exc}") from None
        except Exception as exc:  # a filter or a value blew up on this prospect's data
            raise RenderError(f"{name}: {type(exc).__name__}: {exc}") from None
        return Rendered(subject=one_line(subject) if subject is not None else None, body=body)

    def uses(self, name: str, variable: str) -> bool:
        """Whether the template may read `variable`: it names it, or it includes, imports or
        extends another template (which might)."""
        key = (name, variable)
        if key not in self._uses:
            try:
                ast = self.env.parse(self.source(name))
            except (TemplateNotFound, TemplateSyntaxError):
                return True  # render() reports the file's error
            self._uses[key] = variable in meta.find_undeclared_variables(ast) or any(True for _ in meta.find_referenced_templates(ast))
        return self._uses[key]

    def _subject(self, source: str) -> Any:
        """A step's or variant's subject, compiled once (compiling costs 40x rendering)."""
        if source not in self._subjects:
            try:
                self._subjects[source] = _flat_globals(self.env.from_string(source))
            except TemplateSyntaxError as exc:
                raise RenderError(f"subject {source!r}: {exc.message}") from None
        return self._subjects[source]

    def source(self, name: str) -> str:
        return self.env.loader.get_source(self.env, name)[0]
