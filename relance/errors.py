"""The exception tree.

Two families drive every retry decision, in the manner of dlt: a `TransientError` may
succeed if tried again later (honour `retry_after`), a `TerminalError` never will and is
recorded with its reason. Everything the user can get wrong (spec, config, data) is a
`UserInputError` that names where the problem is.
"""

from __future__ import annotations


class RelanceError(Exception):
    """Base of every error Relance raises on purpose."""


class TransientError(RelanceError):
    """Retry later: timeouts, 429, 5xx, a locked row."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class TerminalError(RelanceError):
    """Record and stop retrying: a hard bounce, a rejected recipient, bad credentials."""


class Unauthenticated(TerminalError):
    """A webhook call whose credentials are missing or do not match: forged, or signed with
    another secret (the web app answers 401, not 400)."""


class OutcomeUnknown(TerminalError):
    """The provider may or may not have sent it (the connection dropped after the message was
    handed over): never resent blindly; the touch is flagged for a person to reconcile."""


class Bounced(TerminalError):
    """The provider refused the recipient at send time (an SMTP 5xx at RCPT): a bounce,
    recorded as one so the address is suppressed like a bounce that arrives later."""

    def __init__(self, message: str, *, hard: bool = True):
        super().__init__(message)
        self.hard = hard


class RenderError(TerminalError):
    """A template failed for one prospect (unknown variable, syntax, sandbox violation)."""


class UserInputError(RelanceError):
    """Bad input from a person: names the file, line and key."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None, key: str | None = None):
        self.file, self.line, self.key, self.detail = file, line, key, message
        super().__init__(self.located())

    def located(self) -> str:
        where = ":".join(str(p) for p in (self.file, self.line) if p is not None)
        parts = [p for p in (where, self.key, self.detail) if p]
        return ": ".join(parts)


class SpecError(UserInputError):
    """A cadence file is invalid."""


class ConfigError(UserInputError):
    """config.yaml is invalid or names something that does not exist."""


class ProspectError(UserInputError):
    """A prospect row is invalid."""


class SpecInvalid(RelanceError):
    """One cadence file has several problems; `problems` lists each, located."""

    def __init__(self, problems: list[UserInputError]):
        self.problems = problems
        super().__init__("\n".join(p.located() for p in problems))
