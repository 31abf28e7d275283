"""Step conditions: small expressions compiled by Jinja2's sandbox, never `eval`.

A condition sees the prospect's fields and a few functions over the enrollment's events:
`opened('intro')`, `clicked('intro')`, `replied()`, `accepted('invite')`,
`call_outcome('call-1') == 'voicemail'`, `happened('meeting_booked')`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from relance.events import EventKind

_env = ImmutableSandboxedEnvironment(undefined=StrictUndefined)

# Names a condition may use besides the prospect's fields.
CONDITION_FUNCTIONS = ("opened", "clicked", "replied", "accepted", "happened", "call_outcome", "sent")
CALL_OUTCOMES = {
    EventKind.call_connected: "connected",
    EventKind.call_voicemail: "voicemail",
    EventKind.call_no_answer: "no_answer",
    EventKind.call_wrong_number: "wrong_number",
}


@lru_cache(maxsize=1024)
def compile_condition(expression: str) -> Callable[..., Any]:
    """Compile once; raises jinja2.TemplateSyntaxError on bad syntax."""
    return _env.compile_expression(expression, undefined_to_none=False)


def check_syntax(expression: str) -> str | None:
    """None if the expression compiles, else the reason."""
    try:
        compile_condition(expression)
    except TemplateSyntaxError as exc:
        return f"invalid condition: {exc.message}"
    return None


def condition_names(expression: str) -> set[str]:
    """The free variable names an expression reads (for validate's unknown-field check)."""
    from jinja2 import meta

    ast = _env.parse("{{ (" + expression + ") }}")
    return set(meta.find_undeclared_variables(ast))


@lru_cache(maxsize=1024)
def reads_prospect(expression: str) -> bool:
    """Whether the expression reads any prospect field (else only the event functions)."""
    return not condition_names(expression) <= set(CONDITION_FUNCTIONS)


def evaluate(expression: str, prospect: Mapping[str, Any], events: Iterable[tuple[str, str | None]]) -> bool:
    """Evaluate against the prospect and the enrollment's (kind, step_id) events.

    A condition on events alone is computed once per distinct event history: dispatch
    evaluates the same `not opened('intro')` for thousands of prospects."""
    seen = tuple(events)
    if reads_prospect(expression):
        return _evaluate(expression, prospect, seen)
    return _evaluate_on_events(expression, seen)


@lru_cache(maxsize=4096)
def _evaluate_on_events(expression: str, seen: tuple[tuple[str, str | None], ...]) -> bool:
    return _evaluate(expression, {}, seen)


def _evaluate(expression: str, prospect: Mapping[str, Any], seen: tuple[tuple[str, str | None], ...]) -> bool:

    def has(kind: EventKind, step: str | None) -> bool:
        return any(k == kind and (step is None or s == step) for k, s in seen)

    def call_outcome(step: str | None = None) -> str | None:
        outcome = None
        for k, s in seen:
            if k in CALL_OUTCOMES and (step is None or s == step):
                outcome = CALL_OUTCOMES[EventKind(k)]
        return outcome

    context = dict(prospect)
    context["prospect"] = prospect
    context.update(
        opened=lambda step=None: has(EventKind.opened, step) or has(EventKind.clicked, step),
        clicked=lambda step=None: has(EventKind.clicked, step),
        replied=lambda step=None: has(EventKind.replied, step),
        accepted=lambda step=None: has(EventKind.accepted, step),
        sent=lambda step=None: has(EventKind.sent, step),
        happened=lambda kind, step=None: has(EventKind(kind), step),
        call_outcome=call_outcome,
    )
    return bool(compile_condition(expression)(**context))
