"""`relance validate`: find every mistake in a workspace before anything is sent.

Nothing here stops at the first problem: a bad file is reported and the others are still
checked, so an SDR fixes a whole cadence in one pass. Every problem names its file, line
and key; a template problem names the template file and line, and the step that uses it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import yaml
from jinja2 import TemplateNotFound, TemplateSyntaxError, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from relance.planning import touch_context
from relance.calendar import BusinessCalendar, zone_for
from relance.conditions import CALL_OUTCOMES, CONDITION_FUNCTIONS, condition_names
from relance.config import Config, load_config
from relance.errors import ConfigError, RenderError, SpecError, SpecInvalid, UserInputError
from relance.events import EventKind
from relance.rendering import LINKEDIN_NOTE_LIMIT, Renderer
from relance.spec import DAY_NAMES, Sequence, Step, parse_sequence
from relance.yamlpos import Path_, line_of, load_with_lines

PROSPECT_FIELDS = (
    "first_name", "last_name", "company", "title", "email", "phone", "linkedin_url",
    "country", "timezone", "language", "account_key", "attributes",
)
# What the engine passes to every template; a template may also read names it sets itself.
TEMPLATE_CONTEXT = ("prospect", "sender", "company", "unsubscribe_url", "sequence", "step")
# Names Jinja2 provides inside templates (loop variables, macros, blocks).
_JINJA_SPECIALS = frozenset({"loop", "caller", "varargs", "kwargs", "self", "super"})
# Condition functions whose first argument is a step id of the same sequence.
STEP_REF_FUNCTIONS = ("opened", "clicked", "accepted", "call_outcome", "sent", "replied")
LINKEDIN_MESSAGE_LIMIT = 8000
OPENING_HORIZON_DAYS = 30
SAMPLE_UNSUBSCRIBE_URL = "https://example.invalid/u/SAMPLE-TOKEN"

_cond_env = ImmutableSandboxedEnvironment()


class _SampleAttributes(dict):
    """Free-form prospect attributes differ per import, so any key gets a sample value."""

    def __missing__(self, key: str) -> str:
        return f"sample {key}"


def _prospect(**fields: str) -> dict[str, Any]:
    return {**fields, "attributes": _SampleAttributes()}


# A typical prospect, and one whose long names push notes and subjects to their limits.
SAMPLE_PROSPECTS: dict[str, dict[str, Any]] = {
    "normal": _prospect(
        first_name="Camille", last_name="Martin", company="Exemple SAS", title="Directrice financière",
        email="camille.martin@exemple.invalid", phone="+33612345678",
        linkedin_url="https://www.linkedin.com/in/camille-martin-exemple", country="FR",
        timezone="Europe/Paris", language="fr", account_key="exemple.invalid",
    ),
    "long": _prospect(
        first_name="Marie-Charlotte-Alexandrine", last_name="de La Tour d'Auvergne-Montmorency-Laval",
        company="Compagnie Européenne de Financement et d'Investissement S.A.",  # 60 characters
        title="Directeur administratif et financier groupe, en charge des opérations internationales",
        email="marie-charlotte-alexandrine.de-la-tour@compagnie-europeenne-financement.invalid",
        phone="+33612345679",
        linkedin_url="https://www.linkedin.com/in/marie-charlotte-alexandrine-de-la-tour-d-auvergne",
        country="FR", timezone="Europe/Paris", language="fr", account_key="compagnie-europeenne-financement.invalid",
    ),
}


def sample_context(config: Config, seq: Sequence, step: Step, prospect: Mapping[str, Any]) -> dict[str, Any]:
    """The context validate renders with; the engine must pass the same shape."""
    pool = config.senders.get(seq.sender.pool) if seq.sender else None
    box = pool[0] if pool else None
    sender = {"name": box.name, "email": box.email, "signature": box.signature} if box else {"name": "Sample Sender", "email": "sender@example.invalid"}
    return touch_context(config, seq, step, prospect, sender, SAMPLE_UNSUBSCRIBE_URL)


def validate_workspace(root: Path, paths: list[Path] | None = None, *, today: date | None = None) -> list[UserInputError]:
    """Every problem in the workspace (or in `paths` only), sorted by file and line.

    Sequences outside `paths` are still read, so references to them resolve.
    """
    run = _Validation(Path(root).resolve(), today or date.today())
    run.run(paths)
    return sorted(run.problems, key=lambda p: (p.file or "", p.line or 0, p.key or "", p.detail))


def format_problems(problems: Iterable[UserInputError], root: Path | None = None) -> str:
    """One `file:line: key: message` line per problem, paths relative to root (or cwd)."""
    base = Path(root).resolve() if root is not None else Path.cwd()
    lines = []
    for problem in problems:
        if problem.file:
            problem = type(problem)(problem.detail, file=_relative(problem.file, base), line=problem.line, key=problem.key)
        lines.append(problem.located())
    return "\n".join(lines)


def _relative(file: str, base: Path) -> str:
    try:
        return str(Path(file).resolve().relative_to(base))
    except ValueError:
        return file


@dataclass
class _Cadence:
    path: Path
    seq: Sequence
    lines: dict[Path_, int]


@dataclass
class _Ref:
    """One template a step renders, and where the cadence file names it."""

    cadence: _Cadence
    step: Step
    template: str
    template_key: Path_  # the key whose value is the template name
    key: Path_  # where render problems are reported (the variant, or the template key)
    subject: str | None  # the subject override from the step or variant
    renderable: bool = True


class _Validation:
    def __init__(self, root: Path, today: date):
        self.root = root
        self.today = today
        self.problems: list[UserInputError] = []
        self.config: Config | None = None
        self.renderer: Renderer | None = None
        self._templates: dict[str, bool] = {}  # template name -> free of problems
        self._users: dict[str, list[_Ref]] = {}

    # -- helpers ---------------------------------------------------------------------------

    def _rel(self, path: Path | str) -> str:
        return _relative(str(path), self.root)

    def _at(self, cadence: _Cadence, path: Path_, message: str, key: str | None = None) -> None:
        self.problems.append(
            SpecError(message, file=str(cadence.path), line=line_of(cadence.lines, path),
                      key=key if key is not None else ".".join(str(p) for p in path))
        )

    # -- the run ---------------------------------------------------------------------------

    def run(self, paths: list[Path] | None) -> None:
        sequences_dir, templates_dir = self._load_config()
        self.renderer = Renderer(templates_dir)
        every, checked = self._files(sequences_dir, paths)
        cadences, names = self._parse(every, checked)
        self._duplicates(cadences, names, checked)
        refs: list[_Ref] = []
        for cadence in cadences:
            if cadence.path in checked:
                refs += self._check_sequence(cadence, names)
        self._check_templates(refs, templates_dir)
        if self.config is not None:
            for ref in refs:
                if ref.renderable and self._templates.get(ref.template):
                    self._check_render(ref)

    def _load_config(self) -> tuple[Path, Path]:
        """Load config.yaml; when it is broken, still find the directories it names."""
        path = self.root / "config.yaml"
        try:
            self.config = load_config(path)
            return self.root / self.config.sequences_dir, self.root / self.config.templates_dir
        except UserInputError as exc:
            self.problems.append(exc if isinstance(exc, ConfigError) else ConfigError(exc.detail, file=exc.file, line=exc.line, key=exc.key))
        raw: Any = {}
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            pass
        raw = raw if isinstance(raw, dict) else {}
        sequences_dir = raw.get("sequences_dir") if isinstance(raw.get("sequences_dir"), str) else "sequences"
        templates_dir = raw.get("templates_dir") if isinstance(raw.get("templates_dir"), str) else "templates"
        return self.root / sequences_dir, self.root / templates_dir

    def _files(self, sequences_dir: Path, paths: list[Path] | None) -> tuple[list[Path], set[Path]]:
        every = sorted(p.resolve() for p in sequences_dir.glob("**/*.y*ml") if p.is_file()) if sequences_dir.is_dir() else []
        if paths is None:
            if not sequences_dir.is_dir():
                self.problems.append(ConfigError(
                    f"no directory {self._rel(sequences_dir)}/ for cadence files",
                    file=str(self.root / "config.yaml"), key="sequences_dir",
                ))
            return every, set(every)
        checked: set[Path] = set()
        for given in paths:
            given = Path(given).resolve()
            if given.is_dir():
                checked.update(p.resolve() for p in given.glob("**/*.y*ml") if p.is_file())
            elif given.is_file():
                checked.add(given)
            else:
                self.problems.append(SpecError("no such file or directory", file=str(given)))
        return sorted(set(every) | checked), checked

    def _parse(self, files: list[Path], checked: set[Path]) -> tuple[list[_Cadence], dict[str, list[Path]]]:
        cadences: list[_Cadence] = []
        names: dict[str, list[Path]] = {}
        for path in files:
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                if path in checked:
                    self.problems.append(SpecError(f"cannot read the file: {exc}", file=str(path)))
                continue
            try:
                seq = parse_sequence(text, str(path))
            except SpecInvalid as exc:
                if path in checked:
                    self.problems.extend(exc.problems)
                # Keep its name known so on_exit references to it are not reported as well.
                try:
                    data = yaml.safe_load(text)
                except yaml.YAMLError:
                    data = None
                if isinstance(data, dict) and isinstance(data.get("name"), str):
                    names.setdefault(data["name"], []).append(path)
                continue
            _, lines = load_with_lines(text, str(path))
            cadences.append(_Cadence(path, seq, lines))
            names.setdefault(seq.name, []).append(path)
        return cadences, names

    def _duplicates(self, cadences: list[_Cadence], names: dict[str, list[Path]], checked: set[Path]) -> None:
        """Report the later file of a pair, or the checked one when the other is not checked."""
        for cadence in cadences:
            if cadence.path not in checked:
                continue
            others = [p for p in names[cadence.seq.name] if p != cadence.path and (p not in checked or p < cadence.path)]
            if others:
                self._at(cadence, ("name",), f"sequence name {cadence.seq.name!r} is also used by {self._rel(others[0])}: names must be unique")

    # -- one sequence ----------------------------------------------------------------------

    def _check_sequence(self, cadence: _Cadence, names: dict[str, list[Path]]) -> list[_Ref]:
        seq = cadence.seq
        if self.config is not None and seq.sender is not None and seq.sender.pool not in self.config.senders:
            known = ", ".join(sorted(self.config.senders)) or "none in config.yaml"
            self._at(cadence, ("sender", "pool"), f"unknown sender pool {seq.sender.pool!r} (known: {known})")
        for outcome, action in seq.on_exit.items():
            if action.enroll not in names:
                known = ", ".join(sorted(names)) or "none"
                self._at(cadence, ("on_exit", outcome, "enroll"), f"no sequence named {action.enroll!r} (known: {known})")
        self._check_window(cadence)
        refs: list[_Ref] = []
        for index, step in enumerate(seq.steps):
            if step.when is not None:
                self._check_condition(cadence, index, step)
            refs += self._refs(cadence, index, step)
        return refs

    def _check_window(self, cadence: _Cadence) -> None:
        """A window that never opens would hold every enrollment forever without an error."""
        schedule = cadence.seq.schedule
        window = schedule.window
        where = ("schedule", "window")
        if not window.days:
            self._at(cadence, where + ("days",), "the window has no day: it never opens")
            return
        if not window.hours or any(r.start == r.end for r in window.hours):
            self._at(cadence, where + ("hours",), "the window has an empty range of hours: it never opens")
            return
        default_zone = self.config.timezone if self.config else "Europe/Paris"
        zone_name = default_zone if schedule.timezone == "prospect" else schedule.timezone
        country, note = None, "no holidays"
        if schedule.holidays == "prospect":
            country = self.config.country if self.config else "FR"
            note = f"holidays of {country}, used for 'holidays: prospect'"
        elif schedule.holidays:
            country, note = schedule.holidays, f"holidays of {schedule.holidays}"
        if schedule.timezone == "prospect":
            note += f"; time zone {zone_name}, used for 'timezone: prospect'"
        zone = zone_for(zone_name, "Europe/Paris")
        start = datetime.combine(self.today, time(0), tzinfo=zone)
        try:
            first, _ = BusinessCalendar(window, zone, country).openings(start, 1)[0]
        except UserInputError:
            first = None
        if first is None or first >= start + timedelta(days=OPENING_HORIZON_DAYS):
            allowed = ", ".join(DAY_NAMES[d] for d in sorted(window.days))
            self._at(cadence, where, f"the window never opens in the next {OPENING_HORIZON_DAYS} days ({allowed}; {note})")

    def _check_condition(self, cadence: _Cadence, index: int, step: Step) -> None:
        where = ("steps", index, "when")
        expression = step.when or ""
        try:
            ast = _cond_env.parse("{{ (" + expression + ") }}")
        except TemplateSyntaxError:
            return  # the spec reports it
        called = {c.node.name for c in ast.find_all(nodes.Call) if isinstance(c.node, nodes.Name)}
        functions = ", ".join(f"{f}()" for f in CONDITION_FUNCTIONS)
        for name in sorted(condition_names(expression)):
            if name in CONDITION_FUNCTIONS:
                if name not in called:
                    self._at(cadence, where, f"{name} is a function: call it, e.g. {name}('step-id')")
            elif name in called:
                self._at(cadence, where, f"unknown function {name}(): use {functions}")
            elif name not in PROSPECT_FIELDS and name != "prospect":
                self._at(cadence, where, f"unknown name {name!r}: a condition reads prospect fields ({', '.join(PROSPECT_FIELDS)}) and {functions}")
        for node in _prospect_attrs(ast):
            self._at(cadence, where, f"prospect has no field {node.attr!r}: use {', '.join(PROSPECT_FIELDS)}")
        steps = cadence.seq.steps
        earlier = {s.id: s for s in steps[:index]}
        every = {s.id for s in steps}
        for call in ast.find_all(nodes.Call):
            if not isinstance(call.node, nodes.Name):
                continue
            function = call.node.name
            args = list(call.args)
            if function == "happened":
                if args and isinstance(args[0], nodes.Const):
                    if args[0].value not in {k.value for k in EventKind}:
                        self._at(cadence, where, f"happened({args[0].value!r}): unknown event kind (use e.g. meeting_booked, replied, accepted)")
                args = args[1:]
            elif function not in STEP_REF_FUNCTIONS:
                continue
            target = args[0] if args else next((k.value for k in call.kwargs if k.key == "step"), None)
            if not isinstance(target, nodes.Const) or not isinstance(target.value, str):
                continue
            sid = target.value
            text = f"{function}({sid!r})"
            if sid not in every:
                self._at(cadence, where, f"{text}: there is no step {sid!r} in this sequence")
            elif sid not in earlier:
                self._at(cadence, where, f"{text}: step {sid!r} does not come before step {step.id!r}, so it cannot have happened yet")
            else:
                self._check_event_fits(cadence, where, text, function, earlier[sid])
        for compare in ast.find_all(nodes.Compare):
            operands = [compare.expr] + [op.expr for op in compare.ops]
            if any(isinstance(o, nodes.Call) and isinstance(o.node, nodes.Name) and o.node.name == "call_outcome" for o in operands):
                literals = [i for o in operands for i in (o.items if isinstance(o, (nodes.List, nodes.Tuple)) else [o])]
                for o in literals:
                    if isinstance(o, nodes.Const) and isinstance(o.value, str) and o.value not in CALL_OUTCOMES.values():
                        self._at(cadence, where, f"unknown call outcome {o.value!r}: use {', '.join(CALL_OUTCOMES.values())}")

    def _check_event_fits(self, cadence: _Cadence, where: Path_, text: str, function: str, target: Step) -> None:
        """A condition on an event the target step can never produce is always false."""
        if function in ("opened", "clicked") and target.email is None:
            self._at(cadence, where, f"{text}: only email steps are opened or clicked, {target.id!r} is a {target.channel.value} step")
        elif function == "accepted" and target.action != "invite":
            self._at(cadence, where, f"{text}: only a LinkedIn invite is accepted, {target.id!r} is a {target.channel.value} {target.action} step")
        elif function == "call_outcome" and target.call is None:
            self._at(cadence, where, f"{text}: {target.id!r} is not a call step")

    def _refs(self, cadence: _Cadence, index: int, step: Step) -> list[_Ref]:
        base: Path_ = ("steps", index)
        out: list[_Ref] = []
        if step.email is not None:
            email = step.email
            subject_ok = self._check_subject(cadence, base + ("email", "subject"), email.subject)
            if email.variants:
                for j, variant in enumerate(email.variants):
                    vkey = base + ("email", "variants", j)
                    ok = subject_ok and self._check_subject(cadence, vkey + ("subject",), variant.subject)
                    template = variant.template or email.template
                    tkey = vkey + ("template",) if variant.template else base + ("email", "template")
                    if template:
                        out.append(_Ref(cadence, step, template, tkey, vkey, variant.subject or email.subject, ok))
            elif email.template:
                key = base + ("email", "template")
                out.append(_Ref(cadence, step, email.template, key, key, email.subject, subject_ok))
        elif step.linkedin is not None and step.linkedin.template:
            key = base + ("linkedin", "template")
            out.append(_Ref(cadence, step, step.linkedin.template, key, key, None))
        elif step.call is not None:
            key = base + ("call", "script")
            out.append(_Ref(cadence, step, step.call.script, key, key, None))
        elif step.task is not None and step.task.template:
            key = base + ("task", "template")
            out.append(_Ref(cadence, step, step.task.template, key, key, None))
        return out

    def _check_subject(self, cadence: _Cadence, where: Path_, subject: str | None) -> bool:
        """A subject written in the cadence is a template too: same syntax and variables."""
        if subject is None:
            return True
        assert self.renderer is not None
        try:
            ast = self.renderer.env.parse(subject)
        except TemplateSyntaxError as exc:
            self._at(cadence, where, f"invalid template syntax in the subject: {exc.message}")
            return False
        found = _variable_problems(ast, set())
        for _, key, message in found:
            self._at(cadence, where, f"{key}: {message}")
        return not found

    # -- templates -------------------------------------------------------------------------

    def _check_templates(self, refs: list[_Ref], templates_dir: Path) -> None:
        for ref in refs:
            self._users.setdefault(ref.template, []).append(ref)
        reported: set[tuple[Path, Path_]] = set()
        for name, users in self._users.items():
            if self._check_template(name, self._used_by(users)) is not None:
                continue
            for ref in users:
                if (ref.cadence.path, ref.template_key) not in reported:
                    reported.add((ref.cadence.path, ref.template_key))
                    self._at(ref.cadence, ref.template_key, f"template {name!r} not found in {self._rel(templates_dir)}/")

    def _used_by(self, users: list[_Ref]) -> str:
        first = users[0]
        where = f"{self._rel(first.cadence.path)}:{line_of(first.cadence.lines, first.template_key)}"
        more = f" and {len(users) - 1} more" if len(users) > 1 else ""
        return f"used by step {first.step.id!r} at {where}{more}"

    def _check_template(self, name: str, used_by: str, inherited: frozenset[str] = frozenset()) -> bool | None:
        """True if the template is free of problems, False if not, None if it does not exist."""
        if name in self._templates:
            return self._templates[name]
        assert self.renderer is not None
        env = self.renderer.env
        try:
            source, filename, _ = env.loader.get_source(env, name)
        except TemplateNotFound:
            return None
        self._templates[name] = True  # an include cycle stops here
        try:
            # The Subject line stays in: it is valid Jinja text and keeps line numbers exact.
            ast = env.parse(source, name, filename)
        except TemplateSyntaxError as exc:
            self.problems.append(UserInputError(f"invalid template syntax: {exc.message} ({used_by})", file=filename, line=exc.lineno))
            self._templates[name] = False
            return False
        ok = True
        declared = _declared_names(ast)
        for lineno, key, message in _variable_problems(ast, declared | inherited):
            self.problems.append(UserInputError(f"{message} ({used_by})", file=filename, line=lineno, key=key))
            ok = False
        for node in ast.find_all((nodes.Include, nodes.Extends, nodes.Import, nodes.FromImport)):
            other = node.template
            if not isinstance(other, nodes.Const) or not isinstance(other.value, str):
                continue
            sub = self._check_template(other.value, f"included from {name}:{node.lineno}", declared | inherited)
            if sub is None:
                if not getattr(node, "ignore_missing", False):
                    self.problems.append(UserInputError(f"template {other.value!r} not found ({used_by})", file=filename, line=node.lineno))
                    ok = False
            elif not sub:
                ok = False
        self._templates[name] = ok
        return ok

    # -- rendering -------------------------------------------------------------------------

    def _check_render(self, ref: _Ref) -> None:
        assert self.config is not None and self.renderer is not None
        cadence, step, seq = ref.cadence, ref.step, ref.cadence.seq
        rendered = {}
        for label, prospect in SAMPLE_PROSPECTS.items():
            try:
                rendered[label] = self.renderer.render(ref.template, sample_context(self.config, seq, step, prospect), ref.subject)
            except RenderError as exc:
                self._at(cadence, ref.key, f"cannot render for the {label} sample prospect: {exc}")
                return
        if step.email is not None:
            company = self.config.company.name
            if any(SAMPLE_UNSUBSCRIBE_URL not in r.body for r in rendered.values()):
                self._at(cadence, ref.key, f"email has no opt-out link: {ref.template} must include {{{{ unsubscribe_url }}}}")
            if any(company not in r.body for r in rendered.values()):
                self._at(cadence, ref.key, f"email does not name the sender's company: {ref.template} must include {{{{ company.name }}}} ({company!r})")
            # A threaded reply takes the subject of the email it answers.
            if step.email.reply_to is None and any(not r.subject for r in rendered.values()):
                self._at(cadence, ref.key, f"email has no subject: start {ref.template} with a 'Subject: ...' line or set subject in the step")
        elif step.linkedin is not None:
            limit, what = (LINKEDIN_NOTE_LIMIT, "note") if step.linkedin.action == "invite" else (LINKEDIN_MESSAGE_LIMIT, "message")
            label, length = max(((lbl, len(r.body.strip())) for lbl, r in rendered.items()), key=lambda x: x[1])
            if length > limit:
                self._at(cadence, ref.key, f"LinkedIn {what} is {length} characters, the limit is {limit} (with the {label} sample prospect)")


def _declared_names(ast: nodes.Template) -> set[str]:
    """Names the template binds itself; scoping is ignored, so this errs on the lenient side."""
    names = {n.name for n in ast.find_all(nodes.Name) if n.ctx in ("store", "param")}
    names |= {m.name for m in ast.find_all(nodes.Macro)}
    names |= {i.target for i in ast.find_all(nodes.Import)}
    for imp in ast.find_all(nodes.FromImport):
        names |= {n[1] if isinstance(n, tuple) else n for n in imp.names}
    return names


def _prospect_attrs(ast: nodes.Node) -> list[nodes.Getattr]:
    """`prospect.x` (or `prospect['x']`) where x is not a prospect field."""
    out = []
    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        if not (isinstance(node.node, nodes.Name) and node.node.name == "prospect" and node.node.ctx == "load"):
            continue
        if isinstance(node, nodes.Getitem):
            if not (isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str)):
                continue
            node = nodes.Getattr(node.node, node.arg.value, "load", lineno=node.lineno)
        if node.attr not in PROSPECT_FIELDS:
            out.append(node)
    return out


def _variable_problems(ast: nodes.Template, declared: set[str] | frozenset[str]) -> list[tuple[int, str, str]]:
    """(line, key, message) for every name the engine will not provide."""
    allowed = set(TEMPLATE_CONTEXT) | _JINJA_SPECIALS | set(_cond_env.globals) | set(declared)
    out: list[tuple[int, str, str]] = []
    seen: set[tuple[int, str]] = set()
    for node in ast.find_all(nodes.Name):
        if node.ctx == "load" and node.name not in allowed and (node.lineno, node.name) not in seen:
            seen.add((node.lineno, node.name))
            out.append((node.lineno, node.name, f"unknown variable {node.name!r}: templates can use {', '.join(TEMPLATE_CONTEXT)}"))
    for attr in _prospect_attrs(ast):
        out.append((attr.lineno, f"prospect.{attr.attr}",
                    f"prospect has no field {attr.attr!r}: use {', '.join(PROSPECT_FIELDS)} (or prospect.attributes.<name>)"))
    return sorted(out)


__all__ = ["format_problems", "sample_context", "validate_workspace", "SAMPLE_PROSPECTS", "PROSPECT_FIELDS", "TEMPLATE_CONTEXT"]
