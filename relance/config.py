"""config.yaml: the workspace's runtime settings, validated with pydantic."""

from __future__ import annotations

from pathlib import Path
from datetime import date
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from relance.errors import ConfigError
from relance.events import Channel
from relance.yamlpos import line_of, read_yaml


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MailServer(_Model):
    """An SMTP or IMAP server of one mailbox. The password is never in the file: it comes
    from an environment variable or a Prefect Secret block (see connectors.mail_secrets)."""

    host: str
    port: int = Field(ge=1, le=65535)
    security: Literal["starttls", "ssl", "none"] = "starttls"
    username: str | None = None
    password_env: str | None = None
    password_secret: str | None = None  # name of a Prefect Secret block
    timeout_seconds: float = Field(default=30.0, gt=0)
    folder: str = "INBOX"  # IMAP only: the folder replies land in


class Warmup(_Model):
    """A new mailbox sends a little more each day until it reaches its daily limit."""

    start: date
    first_day: int = Field(default=20, ge=1)
    increase_per_day: int = Field(default=10, ge=0)

    def daily_cap(self, on: date, daily_limit: int) -> int:
        days = (on - self.start).days
        if days < 0:
            return 0
        return min(daily_limit, self.first_day + days * self.increase_per_day)


class Mailbox(_Model):
    email: str
    name: str
    signature: str = ""
    daily_limit: int = Field(default=200, ge=1)
    hourly_limit: int | None = Field(default=None, ge=1)
    warmup: Warmup | None = None
    smtp: MailServer | None = None
    imap: MailServer | None = None


class ConnectorChoice(_Model):
    use: str = "sandbox"
    settings: dict[str, Any] = {}


class Limits(_Model):
    """Capacity per sender identity; a touch over a limit waits for the next opening."""

    linkedin_per_day: dict[str, int] = {"visit": 80, "invite": 20, "message": 50}
    linkedin_invites_per_week: int = 100
    calls_per_day: int = 80
    # Emails per sending mailbox to one recipient domain per day (a burst to one company's
    # server looks like spam); None for no cap.
    email_per_recipient_domain_per_day: int | None = Field(default=30, ge=1)


class Company(_Model):
    """The sender identity every email carries (CNIL: who writes, and how to object)."""

    name: str
    address: str
    website: str = ""


class Web(_Model):
    base_url: str = "http://127.0.0.1:8000"
    secret_env: str = "RELANCE_SECRET"
    host: str = "127.0.0.1"
    port: int = 8000


class Dispatch(_Model):
    # Each batch costs a few fixed things (one Prefect task per channel, each recorded by
    # Prefect's server, commits, statement set-up): 5000 spreads them thin. Connectors that
    # send one message at a time take a batch's share in calls of their own max_batch, each
    # started with the batch's leases renewed.
    batch_size: int = Field(default=5000, ge=1, le=10_000)
    lease_seconds: int = Field(default=300, ge=10)
    max_attempts: int = Field(default=5, ge=1)


class Schedules(_Model):
    dispatch_cron: str = "* * * * *"
    ingest_cron: str = "*/5 * * * *"
    report_cron: str = "0 7 * * *"
    retention_cron: str = "30 3 * * *"


class Privacy(_Model):
    """Personal data of a prospect idle this long is blanked (relance.privacy); None keeps it.
    Three years from the last contact is the CNIL's guidance for B2B prospects."""

    retention_days: int | None = Field(default=1095, ge=30)


class Config(_Model):
    database: str | None = None
    timezone: str = "Europe/Paris"
    country: str = "FR"
    sequences_dir: str = "sequences"
    templates_dir: str = "templates"
    company: Company
    senders: dict[str, list[Mailbox]] = {}
    connectors: dict[Channel, ConnectorChoice] = {
        Channel.email: ConnectorChoice(),
        Channel.linkedin: ConnectorChoice(),
        Channel.call: ConnectorChoice(),
    }
    limits: Limits = Limits()
    web: Web = Web()
    dispatch: Dispatch = Dispatch()
    schedules: Schedules = Schedules()
    privacy: Privacy = Privacy()

    @field_validator("senders")
    @classmethod
    def _pools_not_empty(cls, value: dict[str, list[Mailbox]]) -> dict[str, list[Mailbox]]:
        for pool, boxes in value.items():
            if not boxes:
                raise ValueError(f"sender pool {pool!r} has no mailbox")
        return value

    def mailbox(self, address: str) -> Mailbox | None:
        for boxes in self.senders.values():
            for box in boxes:
                if box.email == address:
                    return box
        return None


def load_config(path: Path) -> Config:
    if not path.exists():
        raise ConfigError("no config.yaml here: run `relance init` to create a workspace", file=str(path))
    data, lines = read_yaml(path)
    try:
        return Config.model_validate(data or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        raise ConfigError(
            err["msg"].removeprefix("Value error, "),
            file=str(path),
            line=line_of(lines, loc),
            key=".".join(str(p) for p in loc),
        ) from None
