"""Prospects in: validate, normalise and dedupe a CSV file into the store.

Each row is checked on its own, so a broken row is reported with its file line and column
while the rest of the file goes in. Rows are written in batches, with one lookup of the
existing prospects per batch, so a 100k-row file imports in seconds and the same code runs
on SQLite and PostgreSQL. Values are data: control characters become spaces, `{{ }}` stays
those characters (rendering never compiles prospect values).
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache, partial
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit
from zoneinfo import available_timezones

import phonenumbers
from email_validator import EmailNotValidError, validate_email
from phonenumbers import timezone as phone_timezones
from sqlalchemy import and_, bindparam, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DataError, IntegrityError

from relance.errors import ProspectError
from relance.privacy import identities
from relance.store import BulkInsert, Store, datetime_param, prospects, suppressions
from relance.suppression import ERASED, HASHED_KINDS, among, fold_name, hash_identifier, phone_identity

# ---------------------------------------------------------------------------------------------
# Columns

# Canonical field -> header spellings, compared after folding (accents, case, punctuation).
_ALIASES: dict[str, tuple[str, ...]] = {
    "email": ("email", "e_mail", "courriel", "mail", "email_address", "adresse_email", "adresse_e_mail", "adresse_mail"),
    "first_name": ("first_name", "firstname", "prenom", "given_name"),
    "last_name": ("last_name", "lastname", "nom", "nom_de_famille", "surname", "family_name"),
    "company": ("company", "company_name", "societe", "entreprise", "organisation", "organization", "raison_sociale"),
    "title": ("title", "job_title", "jobtitle", "poste", "fonction", "intitule_de_poste"),
    "phone": ("phone", "phone_number", "telephone", "tel", "mobile", "portable", "numero_de_telephone"),
    "linkedin_url": ("linkedin", "linkedin_url", "url_linkedin", "linkedin_profile", "profil_linkedin"),
    "timezone": ("timezone", "time_zone", "tz", "fuseau", "fuseau_horaire"),
    "country": ("country", "pays", "country_code", "code_pays"),
    "language": ("language", "langue", "lang", "locale"),
}
_FIELD_OF = {alias: name for name, aliases in _ALIASES.items() for alias in aliases}
IDENTIFIERS = ("email", "linkedin_url", "phone")
_TEXT_FIELDS = ("first_name", "last_name", "company", "title")
_MAX_LEN = {c.name: c.type.length for c in prospects.columns if getattr(c.type, "length", None)}
# What a row gives a new prospect, then its attributes, source and times.
_GIVEN = ("email", "first_name", "last_name", "company", "account_key", "title", "phone", "linkedin_url", "timezone", "country", "language")
INSERT_PROSPECTS = BulkInsert("prospects", (*_GIVEN, "attributes", "source", "created_at", "updated_at"))


_fold = fold_name  # accent- and case-insensitive: `Prénom`, `PRENOM` and `prenom` are one header


@dataclass(frozen=True, slots=True)
class _Columns:
    fields: dict[str, tuple[str, ...]]  # canonical field -> the file's headers, in file order
    extras: tuple[tuple[str, str], ...]  # (header as read, attribute name) of unknown columns


@lru_cache(maxsize=64)
def _columns(headers: tuple[str, ...]) -> _Columns:
    fields: dict[str, list[str]] = {}
    extras: list[tuple[str, str]] = []
    for header in headers:
        key = re.sub(r"[^0-9a-z]+", "_", _fold(header)).strip("_")
        if key in _FIELD_OF:
            fields.setdefault(_FIELD_OF[key], []).append(header)
        elif header.strip():
            extras.append((header, _clean(header)))
    return _Columns({k: tuple(v) for k, v in fields.items()}, tuple(extras))


def _value(row: Mapping[str, Any], cols: _Columns, name: str) -> tuple[str, str]:
    """(first non-empty value, its header): a file may carry both `Téléphone` and `Mobile`."""
    headers = cols.fields.get(name, ())
    for header in headers:
        value = row.get(header)
        if value is not None and (value := str(value).strip()):
            return value, header
    return "", headers[0] if headers else name


# ---------------------------------------------------------------------------------------------
# Values

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_INVISIBLE = re.compile(r"[\u202a-\u202e\u2066-\u2069\ufeff]")  # bidi overrides reorder what a reader sees


def _clean(value: str) -> str:
    """Control characters (CR, LF, tab, NUL...) become a space: they could split a header line."""
    return _CONTROL.sub(" ", _INVISIBLE.sub("", value)).strip()


# A plain ASCII dot-atom local part, which email_validator always accepts: for these only the
# domain needs its check, and domains repeat (colleagues), so that check is cached.
_PLAIN_LOCAL = re.compile(r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*")


@lru_cache(maxsize=8192)
def _checked_domain(domain: str) -> str:
    return validate_email("x@" + domain, check_deliverability=False).domain


def normalise_email(raw: str) -> str:
    """Lowercased and syntax-checked by email_validator; deliverability is the connector's business."""
    address = raw.strip().lower()
    try:
        local, at, domain = address.rpartition("@")
        if at and domain.isascii() and len(local) <= 64 and len(address) <= 254 and _PLAIN_LOCAL.fullmatch(local):
            return f"{local}@{_checked_domain(domain)}"
        return validate_email(address, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise ValueError(f"invalid email address {raw!r}: {exc}") from None


# phonenumbers.parse is a third of an import's time. For the common shapes (+<code><digits>,
# or 0<digits> in a country whose trunk prefix is a plain 0) the number is built directly and
# phonenumbers still decides validity; anything else goes through the full parser.
_TRUNK_ZERO = {"FR": 33, "GB": 44, "BE": 32, "CH": 41, "DE": 49, "NL": 31, "AT": 43, "IE": 353}
_DIRECT_CODES = frozenset(_TRUNK_ZERO.values()) | {1, 34, 39, 351, 352, 377}
_SEPARATORS = str.maketrans("", "", " .-()/\u00a0")


def _direct_number(raw: str, region: str) -> phonenumbers.PhoneNumber | None:
    digits = raw.translate(_SEPARATORS)
    if not digits.isascii():
        return None
    if digits.startswith("+") and digits[1:].isdigit() and digits[1] != "0":
        code = next((c for n in (1, 2, 3) if (c := int(digits[1 : 1 + n])) in _DIRECT_CODES), None)
        national = digits[1 + len(str(code)) :] if code else ""
    elif digits.isdigit() and digits.startswith("0") and region in _TRUNK_ZERO:
        code, national = _TRUNK_ZERO[region], digits[1:]
    else:
        return None
    if not national or national[0] == "0" or len(national) > 14 or (code == 1 and national[0] == "1"):
        return None  # a trunk or Italian leading zero, a doubled 1: leave those to the parser
    number = phonenumbers.PhoneNumber(country_code=code, national_number=int(national))
    return number if phonenumbers.is_valid_number(number) else None


def normalise_phone(raw: str, region: str) -> phonenumbers.PhoneNumber:
    """Parsed with the prospect's country as the region of national-format numbers."""
    number = _direct_number(raw, region)
    if number is not None:
        return number
    try:
        number = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"invalid phone number {raw!r}: {exc}") from None
    if not phonenumbers.is_valid_number(number):
        raise ValueError(f"invalid phone number {raw!r} (read with country {region})")
    return number


_LINKEDIN_HOST = re.compile(r"(?:www\.|m\.|[a-z]{2,3}\.)?linkedin\.com")
_SLUG = re.compile(r"[\w-]+")


def normalise_linkedin_url(raw: str) -> str:
    """https://www.linkedin.com/in/<slug>, so the same person dedupes whatever link was pasted."""
    value = raw.strip()
    if not re.match(r"[a-z][a-z0-9+.-]*://", value, re.IGNORECASE):
        value = "https://" + value.removeprefix("//")
    try:
        parts = urlsplit(value)
        host = parts.hostname or ""
    except ValueError:
        raise ValueError(f"not a URL: {raw!r}") from None
    if parts.scheme.lower() not in ("http", "https") or not _LINKEDIN_HOST.fullmatch(host):
        raise ValueError(f"not a LinkedIn URL: {raw!r}")
    segments = [s for s in parts.path.split("/") if s]
    if not segments or segments[0].lower() != "in" or len(segments) < 2:
        if segments and segments[0].lower() in ("company", "school", "showcase", "groups"):
            raise ValueError(f"a LinkedIn {segments[0].lower()} page, not a person's profile: {raw!r}")
        raise ValueError(f"not a LinkedIn profile URL (linkedin.com/in/<name>): {raw!r}")
    slug = unquote(segments[1]).strip().casefold()
    if not _SLUG.fullmatch(slug):
        raise ValueError(f"not a LinkedIn profile URL (linkedin.com/in/<name>): {raw!r}")
    return "https://www.linkedin.com/in/" + quote(slug, safe="-_")


# Beyond this map, a country's zone comes from phonenumbers when the country has only one.
_COUNTRY_ZONES = {
    "FR": "Europe/Paris", "GB": "Europe/London", "US": "America/New_York", "CA": "America/Toronto",
    "BE": "Europe/Brussels", "CH": "Europe/Zurich", "DE": "Europe/Berlin", "ES": "Europe/Madrid",
    "IT": "Europe/Rome", "NL": "Europe/Amsterdam", "LU": "Europe/Luxembourg", "PT": "Europe/Lisbon",
    "IE": "Europe/Dublin", "AT": "Europe/Vienna", "MC": "Europe/Monaco", "MA": "Africa/Casablanca",
    "TN": "Africa/Tunis", "DZ": "Africa/Algiers", "SN": "Africa/Dakar", "CI": "Africa/Abidjan",
    "AU": "Australia/Sydney", "BR": "America/Sao_Paulo", "MX": "America/Mexico_City",
    "RU": "Europe/Moscow", "IN": "Asia/Kolkata", "CN": "Asia/Shanghai", "JP": "Asia/Tokyo",
}  # fmt: skip
_COUNTRY_NAMES = {
    "france": "FR", "uk": "GB", "united kingdom": "GB", "royaume uni": "GB", "england": "GB",
    "angleterre": "GB", "usa": "US", "united states": "US", "etats unis": "US", "canada": "CA",
    "belgique": "BE", "belgium": "BE", "suisse": "CH", "switzerland": "CH", "allemagne": "DE",
    "germany": "DE", "espagne": "ES", "spain": "ES", "italie": "IT", "italy": "IT",
    "pays bas": "NL", "netherlands": "NL", "luxembourg": "LU", "portugal": "PT",
    "irlande": "IE", "ireland": "IE", "maroc": "MA", "morocco": "MA", "tunisie": "TN",
    "algerie": "DZ", "senegal": "SN",
}  # fmt: skip


@lru_cache(maxsize=1)
def _zones() -> dict[str, str]:
    """casefolded name -> IANA name; available_timezones() reads the disk, so once."""
    return {name.casefold(): name for name in available_timezones()}


def normalise_timezone(raw: str) -> str:
    """An IANA name, any case: `europe/paris` is what a spreadsheet user types."""
    zone = _zones().get(raw.strip().casefold())
    if zone is None:
        raise ValueError(f"unknown time zone {raw!r}: use an IANA name such as Europe/Paris")
    return zone


@lru_cache(maxsize=512)
def normalise_country(raw: str) -> str:
    """ISO 3166 alpha-2, also from a few common English and French names."""
    folded = re.sub(r"[^a-z]+", " ", _fold(raw)).strip()
    code = _COUNTRY_NAMES.get(folded) or folded.upper()
    if code not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError(f"unknown country {raw!r}: use a two-letter ISO code such as FR")
    return code


@lru_cache(maxsize=512)
def country_timezone(country: str) -> str | None:
    if country in _COUNTRY_ZONES:
        return _COUNTRY_ZONES[country]
    example = phonenumbers.example_number(country)
    zones = phone_timezones.time_zones_for_number(example) if example else ()
    return zones[0] if len(zones) == 1 and zones[0].casefold() in _zones() else None


def _phone_timezone(number: phonenumbers.PhoneNumber, country: str) -> str | None:
    """The number's zone when it names one, or the country's own zone when that is among them.

    The number is already validated, so the geographical lookup (a prefix search) is enough;
    time_zones_for_number would validate it a second time, a tenth of the import's cost.
    """
    found = phone_timezones.time_zones_for_geographical_number(number)
    zones = [z for z in found if z.casefold() in _zones()]
    if len(zones) == 1:
        return zones[0]
    preferred = country_timezone(country)
    return preferred if preferred in zones else None


_LANGUAGE = re.compile(r"([a-z]{2,3})(?:[-_]([a-z]{2}))?", re.IGNORECASE)
_LANGUAGE_NAMES = {
    "francais": "fr", "french": "fr", "anglais": "en", "english": "en", "allemand": "de",
    "german": "de", "espagnol": "es", "spanish": "es", "italien": "it", "italian": "it",
    "neerlandais": "nl", "dutch": "nl", "portugais": "pt", "portuguese": "pt",
}  # fmt: skip


def normalise_language(raw: str) -> str:
    """`fr` or `fr-CA`: what template selection compares against."""
    folded = _fold(raw.strip())
    if folded in _LANGUAGE_NAMES:
        return _LANGUAGE_NAMES[folded]
    match = _LANGUAGE.fullmatch(folded)
    if not match:
        raise ValueError(f"unknown language {raw!r}: use a code such as fr, en or fr-CA")
    return match[1] + (f"-{match[2].upper()}" if match[2] else "")


# ---------------------------------------------------------------------------------------------
# Account key

_FREEMAIL = frozenset(
    "gmail.com googlemail.com icloud.com me.com mac.com orange.fr wanadoo.fr free.fr laposte.net "
    "sfr.fr neuf.fr bbox.fr numericable.fr club-internet.fr aliceadsl.fr proton.me pm.me "
    "protonmail.com protonmail.ch mail.com mail.ru web.de t-online.de libero.it virgilio.it "
    "skynet.be telenet.be bluewin.ch seznam.cz wp.pl o2.pl qq.com 163.com tutanota.com".split()
)
# Families with one domain per country: yahoo.fr, hotmail.co.uk, outlook.com.br, gmx.de...
_FREEMAIL_FAMILY = re.compile(
    r"(?:yahoo|ymail|rocketmail|hotmail|outlook|live|msn|windowslive|aol|gmx|yandex|protonmail|zoho)"
    r"\.(?:[a-z]{2,3}|(?:co|com)\.[a-z]{2})"
)
_LEGAL_SUFFIXES = frozenset(
    "sas sasu sa sarl eurl sci snc selarl inc incorporated ltd limited llc llp plc corp corporation "
    "gmbh ag bv nv srl spa sl".split()
)


def is_freemail(domain: str) -> bool:
    return domain in _FREEMAIL or bool(_FREEMAIL_FAMILY.fullmatch(domain))


def company_key(name: str) -> str | None:
    """`Société Générale S.A.` and `societe generale` are one account."""
    text = _fold(name).replace(".", "")
    tokens = re.sub(r"[\W_]+", " ", text).split()
    while len(tokens) > 1 and tokens[-1] in _LEGAL_SUFFIXES:
        tokens.pop()
    return " ".join(tokens)[: _MAX_LEN["account_key"]] or None


def account_key(email: str | None, company: str | None) -> str | None:
    """The work email's domain, else the normalised company: groups colleagues of one account."""
    if email:
        domain = email.rpartition("@")[2]
        if not is_freemail(domain):
            return domain[: _MAX_LEN["account_key"]]
    return company_key(company) if company else None


# ---------------------------------------------------------------------------------------------
# A row


def _parsed(row: Mapping[str, Any], cols: _Columns, name: str, parse: Callable[[str], Any]) -> tuple[Any, str]:
    """(parsed value or None when empty, its column); a parse error names the column."""
    raw, column = _value(row, cols, name)
    if not raw:
        return None, column
    try:
        return parse(raw), column
    except ValueError as exc:
        raise ProspectError(str(exc), key=column) from None


def _normalise(
    row: Mapping[str, Any], cols: _Columns, default_country: str, default_timezone: str
) -> tuple[dict[str, Any], frozenset[str]]:
    """(values for `prospects`, the fields that were derived rather than given)."""
    derived: set[str] = set()
    country, _ = _parsed(row, cols, "country", normalise_country)
    email, _ = _parsed(row, cols, "email", normalise_email)
    number, _ = _parsed(row, cols, "phone", lambda raw: normalise_phone(raw, country or default_country))
    phone = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164) if number else None
    linkedin, column = _parsed(row, cols, "linkedin_url", normalise_linkedin_url)
    if linkedin and len(linkedin) > _MAX_LEN["linkedin_url"]:
        raise ProspectError("LinkedIn URL too long", key=column)

    if country is None:
        derived.add("country")
        region = phonenumbers.region_code_for_number(number) if number else None
        country = region if region in phonenumbers.SUPPORTED_REGIONS else default_country
    zone, _ = _parsed(row, cols, "timezone", normalise_timezone)
    if zone is None:
        derived.add("timezone")
        zone = (number and _phone_timezone(number, country)) or country_timezone(country) or default_timezone
    language, _ = _parsed(row, cols, "language", normalise_language)

    values: dict[str, Any] = {"email": email, "phone": phone, "linkedin_url": linkedin}
    for name in _TEXT_FIELDS:
        raw, column = _value(row, cols, name)
        text = _clean(raw) or None
        if text and len(text) > _MAX_LEN[name]:
            raise ProspectError(f"too long ({len(text)} characters, at most {_MAX_LEN[name]})", key=column)
        values[name] = text
    if not (email or phone or linkedin):
        raise ProspectError("needs an email, a LinkedIn URL or a phone number", key=None)
    if not (values["first_name"] or values["last_name"]):
        raise ProspectError("needs a first name or a last name", key=_value(row, cols, "first_name")[1])

    attributes = {name: _clean(str(row.get(header) or "")) for header, name in cols.extras}
    values.update(
        account_key=account_key(email, values["company"]),
        timezone=zone,
        country=country,
        language=language,
        attributes=attributes,
    )
    return values, frozenset(derived)


def normalise_row(
    row: Mapping[str, str], *, default_country: str = "FR", default_timezone: str = "Europe/Paris"
) -> dict[str, Any]:
    """The `prospects` values of one row with English or French headers.

    Raises ProspectError(key=<the row's column>) for the first problem found.
    """
    cols = _columns(tuple(k for k in row if isinstance(k, str)))
    try:
        defaults = normalise_country(default_country), normalise_timezone(default_timezone)
    except ValueError as exc:
        raise ProspectError(str(exc), key="default") from None
    return _normalise(row, cols, *defaults)[0]


# ---------------------------------------------------------------------------------------------
# Import


@dataclass(frozen=True, slots=True)
class Rejection:
    row_number: int  # the FILE line where the row starts: the header is line 1, data row n is line n+1
    reason: str
    column: str | None  # the header as written in the file
    raw: dict[str, str]


@dataclass(slots=True)
class ImportReport:
    imported: int = 0  # new prospects
    updated: int = 0  # existing prospects given the row's values: same email, LinkedIn URL, or
    # for a row with neither, same phone and name
    duplicates: int = 0  # rows naming someone an earlier row of the file already named
    rejected: list[Rejection] = field(default_factory=list)
    # The prospects the file imported or updated, in file order: what `enroll` enrolls.
    prospect_ids: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.imported + self.updated + self.duplicates + len(self.rejected)


@dataclass(slots=True)
class _Row:
    line: int
    raw: dict[str, str]
    values: dict[str, Any]
    derived: frozenset[str]
    phone_key: str | None = None

    def __post_init__(self) -> None:
        self.phone_key = _phone_key(self.values)


def _phone_key(values: Mapping[str, Any]) -> str | None:
    """What identifies a call-list row (a phone, no email, no LinkedIn): number and name."""
    if values["email"] or values["linkedin_url"] or not values["phone"]:
        return None
    return phone_identity(values["phone"], values["first_name"], values["last_name"])


def _open_csv(path: Path) -> tuple[Iterator[list[str]], Any]:
    """(csv reader, file): `;` or `,` as the header uses; UTF-8, else cp1252 (Excel on Windows)."""
    try:
        with path.open("rb") as f:
            head = f.read(1 << 16)
    except OSError as exc:
        raise ProspectError(f"cannot read the file: {exc.strerror}", file=str(path)) from None
    encoding = "utf-8-sig"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not merely a character cut by the 64 KiB boundary
            encoding = "cp1252"
    first = head.decode(encoding, errors="replace").splitlines()[0] if head.strip() else ""
    delimiter = max((";", ",", "\t"), key=lambda d: (first.count(d), d == ","))
    f = path.open(encoding=encoding, errors="replace", newline="")
    return csv.reader(f, delimiter=delimiter), f


def import_csv(
    store: Store,
    path: Path,
    *,
    now: datetime,
    default_country: str = "FR",
    default_timezone: str = "Europe/Paris",
    progress: Callable[[int], None] | None = None,
    batch_size: int = 1000,
    workers: int | None = 0,
) -> ImportReport:
    """Import a prospect file; `progress` receives the number of data rows read so far.

    A broken row is rejected with its file line and column and the rest goes in. Each batch
    commits on its own, so an interrupted import resumes by running it again: matching
    prospects are updated, never duplicated. Prospects erased on request are not re-created.
    `workers` processes validate the rows: 0, this one; None, as many as the file's size and
    the machine's cores make worth starting. They are started by `spawn`, which imports the
    caller's main module again: a script that passes None needs the `if __name__ ==
    "__main__":` guard (the `relance` command and Prefect's entry points have it).
    """
    path = Path(path)
    try:
        default_country = normalise_country(default_country)
        default_timezone = normalise_timezone(default_timezone)
    except ValueError as exc:
        raise ProspectError(str(exc), file=str(path)) from None
    reader, f = _open_csv(path)
    state = _Import(store, source=path.name[: _MAX_LEN["source"]], now=now)
    with f:
        try:
            header = next(reader, None)
        except csv.Error as exc:
            raise ProspectError(f"unreadable CSV header: {exc}", file=str(path), line=1) from None
        if not header or not any(h.strip() for h in header):
            raise ProspectError("no header row: the first line must name the columns", file=str(path), line=1)
        cols = _columns(tuple(header))
        if not any(cols.fields.get(name) for name in IDENTIFIERS):
            raise ProspectError(
                "no email, LinkedIn or phone column (found: " + ", ".join(h for h in header if h.strip()) + ")",
                file=str(path),
                line=1,
            )
        check = partial(_check_chunk, tuple(header), default_country, default_timezone)
        if workers is None:
            workers = _workers_for(path)
        batch: list[_Row] = []
        rows_read = 0
        for result in _checked(_chunks(_records(reader)), check, workers):
            rows_read += 1
            if isinstance(result, Rejection):
                state.report.rejected.append(result)
                continue
            row = result
            if state.seen(row):
                state.report.duplicates += 1
                continue
            batch.append(row)
            if len(batch) >= batch_size:
                state.flush(batch)
                batch = []
                if progress:
                    progress(rows_read)
        if batch:
            state.flush(batch)
        if progress:
            progress(rows_read)
    return state.report


# Validating a row (email_validator, phonenumbers: pure Python) is most of an import's CPU.
# In a large file it is done by worker processes, a chunk of records at a time and handed
# back in file order, while this process reads ahead and writes the batches: the machine's
# other cores share the work. A small file is checked here: starting a worker (importing
# this module) costs about half a second.
_CHUNK_ROWS = 2000
_PARALLEL_FROM_BYTES = 4 << 20  # about 40,000 rows


def _workers_for(path: Path) -> int:
    cores = os.cpu_count() or 1
    if cores < 2 or path.stat().st_size < _PARALLEL_FROM_BYTES:
        return 0
    return min(cores - 1, 3)


def _records(reader: Iterator[list[str]]) -> Iterator[tuple[int, list[str] | str]]:
    """(file line, values) per non-blank record, (file line, why) for an unreadable one."""
    while True:
        line = reader.line_num + 1  # where the next record starts; quoted fields may span lines
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield line, f"unreadable CSV row: {exc}"
            if reader.line_num < line:
                return
            continue
        if any(v.strip() for v in values):
            yield line, values


def _chunks(records: Iterator[Any]) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for record in records:
        chunk.append(record)
        if len(chunk) >= _CHUNK_ROWS:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _check_chunk(
    header: tuple[str, ...], default_country: str, default_timezone: str, records: list[tuple[int, list[str] | str]]
) -> list[_Row | Rejection]:
    """Each record as a row ready to write, or its rejection: in this process or a worker."""
    cols = _columns(header)
    out: list[_Row | Rejection] = []
    for line, values in records:
        if isinstance(values, str):
            out.append(Rejection(line, values, None, {}))
            continue
        raw = dict(zip(header, values))
        for h in header[len(values) :]:
            raw[h] = ""
        if any(v.strip() for v in values[len(header) :]):
            out.append(Rejection(line, f"{len(values)} values but {len(header)} columns in the header", None, raw))
            continue
        if any("\ufffd" in v for v in values):
            out.append(Rejection(line, "characters that are not valid UTF-8: save the file as UTF-8", None, raw))
            continue
        try:
            normalised, derived = _normalise(raw, cols, default_country, default_timezone)
        except ProspectError as exc:
            out.append(Rejection(line, exc.detail, exc.key, raw))
            continue
        out.append(_Row(line, raw, normalised, derived))
    return out


def _checked(chunks: Iterator[list[Any]], check: Callable[[list[Any]], list[Any]], workers: int) -> Iterator[Any]:
    """check(chunk) for every chunk, results in order; with workers, a few chunks ahead."""
    if workers <= 0:
        for chunk in chunks:
            yield from check(chunk)
        return
    # spawn: a fork of a process with threads (Prefect's, a web server's) may deadlock
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        pending: deque[Future[list[Any]]] = deque()
        for chunk in chunks:
            pending.append(pool.submit(check, chunk))
            if len(pending) > 2 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _Import:
    """State across batches: who the file has named so far and which prospects it touched."""

    def __init__(self, store: Store, *, source: str, now: datetime):
        self.store, self.source, self.now = store, source, now
        self.report = ImportReport()
        self.seen_keys: set[tuple[str, Any]] = set()
        self.touched: set[int] = set()  # existing prospects already updated by an earlier row

    def reject(self, line: int, raw: dict[str, str], reason: str, column: str | None) -> None:
        self.report.rejected.append(Rejection(line, reason, column, raw))

    def seen(self, row: _Row) -> bool:
        """Same email, same LinkedIn URL, or (call lists) same phone and name as an earlier row."""
        keys = [("email", row.values["email"]), ("linkedin", row.values["linkedin_url"]), ("phone", row.phone_key)]
        keys = [k for k in keys if k[1]]
        if any(k in self.seen_keys for k in keys):
            return True
        self.seen_keys.update(keys)
        return False

    def flush(self, batch: list[_Row]) -> None:
        try:
            with self.store.begin() as conn:
                outcome = self._write(conn, batch)
            self._apply(outcome)
            return
        except (IntegrityError, DataError):
            pass  # a concurrent writer or a value the database refuses: isolate the row
        for row in batch:
            try:
                with self.store.begin() as conn:
                    outcome = self._write(conn, [row])
            except (IntegrityError, DataError) as exc:
                message = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
                outcome = _Outcome(rejected=[(row, f"the database refused the row: {message}", None)])
            self._apply(outcome)

    def _apply(self, outcome: _Outcome) -> None:
        self.report.imported += outcome.imported
        self.report.updated += outcome.updated
        self.report.duplicates += outcome.duplicates
        self.report.prospect_ids.extend(outcome.ids)
        self.touched |= outcome.touched
        for row, reason, column in outcome.rejected:
            self.reject(row.line, row.raw, reason, column)

    def _write(self, conn: Connection, batch: Sequence[_Row]) -> _Outcome:
        """Match the batch against the store with one lookup, then update and insert in bulk."""
        found = _Matches.lookup(conn, batch)
        erasures = (suppressions.c.kind.in_(HASHED_KINDS), suppressions.c.reason == ERASED)
        digests: dict[int, list[str]] = {}
        erased: set[str] = set()
        # Hash the batch only if anyone was ever erased: most stores have no erasure at all.
        if conn.scalar(select(suppressions.c.id).where(*erasures).limit(1)) is not None:
            digests = {id(r): [hash_identifier(v) for v in identities(r.values) if v] for r in batch}
            wanted = {h for hashes in digests.values() for h in hashes}
            query = select(suppressions.c.value).where(*erasures, among(conn, suppressions.c.value, wanted))
            erased = set(conn.scalars(query))

        out = _Outcome()
        accepted: list[tuple[_Row, int | None]] = []  # None: inserted, id known after the insert
        inserts: list[dict[str, Any]] = []
        updates: list[dict[str, Any]] = []
        for row in batch:
            v = row.values
            email, linkedin = v["email"], v["linkedin_url"]
            if erased and not erased.isdisjoint(digests[id(row)]):
                out.rejected.append((row, "erased on request", None))
                continue
            id_email, id_linkedin = found.by_email.get(email), found.by_linkedin.get(linkedin)
            if id_email and id_linkedin and id_email != id_linkedin:
                column = _value(row.raw, _columns(tuple(row.raw)), "linkedin_url")[1]
                out.rejected.append(
                    (row, f"the email is prospect #{id_email}'s but the LinkedIn URL is #{id_linkedin}'s", column)
                )
                continue
            pid = id_email or id_linkedin or found.by_phone.get(row.phone_key)
            if pid is None:
                inserts.append(v)
                out.imported += 1
                accepted.append((row, None))
            elif pid in self.touched or pid in out.touched:
                out.duplicates += 1  # another row of this file already matched this prospect
            else:
                out.touched.add(pid)
                out.updated += 1
                accepted.append((row, pid))
                old = found.rows[pid]
                merged = _merge(old, v, row.derived)
                if any(merged[k] != old[k] for k in merged):
                    updates.append({"_id": pid, **merged, "updated_at": self.now})
        if updates:
            conn.execute(update(prospects).where(prospects.c.id == bindparam("_id")), updates)
        new = _Matches()
        if inserts:
            # COPY on PostgreSQL, driver executemany on SQLite; then one SELECT reads the new
            # ids. SQLAlchemy's executemany spent longer building and binding parameters than
            # the database took to write; INSERT..RETURNING costs more still (psycopg parses
            # its 15,000-parameter statements slowly, SQLite inserts row by row to keep order).
            at = datetime_param(conn.dialect)
            now = at(self.now)
            INSERT_PROSPECTS.run(conn, [(*(v[c] for c in _GIVEN), json.dumps(v["attributes"]), self.source, now, now) for v in inserts])
            new = _Matches.lookup(conn, [row for row, pid in accepted if pid is None], full=False)
        out.ids = [pid if pid is not None else new.id_of(row) for row, pid in accepted]
        return out


@dataclass(slots=True)
class _Matches:
    """The stored prospects a batch names, by email, LinkedIn URL and call-list key."""

    rows: dict[int, dict[str, Any]] = field(default_factory=dict)
    by_email: dict[str | None, int] = field(default_factory=dict)
    by_linkedin: dict[str | None, int] = field(default_factory=dict)
    by_phone: dict[str | None, int] = field(default_factory=dict)

    COLUMNS = (
        prospects.c.id, prospects.c.email, prospects.c.linkedin_url, prospects.c.phone,
        prospects.c.first_name, prospects.c.last_name,
    )  # fmt: skip

    @classmethod
    def lookup(cls, conn: Connection, batch: Sequence[_Row], *, full: bool = True) -> _Matches:
        """One SELECT; the phone clause only for call-list rows, since phone has no index."""
        emails = [r.values["email"] for r in batch if r.values["email"]]
        linkedins = [r.values["linkedin_url"] for r in batch if r.values["linkedin_url"]]
        phones = [r.values["phone"] for r in batch if r.phone_key]
        if not (emails or linkedins or phones):
            return cls()
        c = prospects.c
        clauses = [among(conn, c.email, emails), among(conn, c.linkedin_url, linkedins)]
        if phones:
            clauses.append(and_(among(conn, c.phone, phones), c.email.is_(None), c.linkedin_url.is_(None)))
        columns = (prospects,) if full else cls.COLUMNS
        return cls.index(conn.execute(select(*columns).where(or_(*clauses))).mappings(), keep=full)

    @classmethod
    def index(cls, found: Iterable[Mapping[str, Any]], *, keep: bool = False) -> _Matches:
        matches = cls()
        for row in found:
            pid = row["id"]
            if keep:
                matches.rows[pid] = dict(row)
            if row["email"]:
                matches.by_email[row["email"]] = pid
            if row["linkedin_url"]:
                matches.by_linkedin[row["linkedin_url"]] = pid
            if (key := _phone_key(row)) and pid > matches.by_phone.get(key, 0):
                matches.by_phone[key] = pid  # the newest, should older call-list twins exist
        return matches

    def id_of(self, row: _Row) -> int:
        v = row.values
        return self.by_email.get(v["email"]) or self.by_linkedin.get(v["linkedin_url"]) or self.by_phone[row.phone_key]


@dataclass(slots=True)
class _Outcome:
    imported: int = 0
    updated: int = 0
    duplicates: int = 0
    touched: set[int] = field(default_factory=set)
    ids: list[int] = field(default_factory=list)
    rejected: list[tuple[_Row, str, str | None]] = field(default_factory=list)


_MERGED = ("email", "first_name", "last_name", "company", "title", "phone", "linkedin_url", "language")


def _merge(old: Mapping[str, Any], new: Mapping[str, Any], derived: frozenset[str]) -> dict[str, Any]:
    """The row's non-empty values win; a derived zone or country never overrides a stored one."""
    merged = {name: new[name] or old[name] for name in _MERGED}
    for name in ("timezone", "country"):
        merged[name] = old[name] if name in derived and old[name] else new[name]
    attributes = dict(old["attributes"] or {})
    attributes.update({k: v for k, v in new["attributes"].items() if v or k not in attributes})
    merged["attributes"] = attributes
    merged["account_key"] = account_key(merged["email"], merged["company"]) or old["account_key"]
    return merged


# ---------------------------------------------------------------------------------------------
# Queries and erasure

_FILTERABLE = frozenset(
    ("email", "first_name", "last_name", "company", "account_key", "title", "phone", "linkedin_url",
     "timezone", "country", "language", "source")
)  # fmt: skip


def find_prospects(
    conn: Connection, *, emails: list[str] | None = None, where: Mapping[str, str] | None = None
) -> list[int]:
    """Ids of live prospects with these emails and/or matching every `where` equality.

    `where` keys are prospect columns (country, company, title, account_key...) or
    `attributes.<name>` for an imported extra column. Erased prospects are never returned.
    """
    conditions = [prospects.c.erased_at.is_(None)]
    for key, value in (where or {}).items():
        if key.startswith("attributes.") and len(key) > len("attributes."):
            conditions.append(prospects.c.attributes[key.removeprefix("attributes.")].as_string() == str(value))
        elif key in _FILTERABLE:
            value = str(value).strip()
            value = value.upper() if key == "country" else value.lower() if key == "email" else value
            conditions.append(prospects.c[key] == value)
        else:
            allowed = ", ".join(sorted(_FILTERABLE))
            raise ProspectError(f"cannot filter on {key!r}: use one of {allowed} or attributes.<name>", key=key)
    stmt = select(prospects.c.id).where(*conditions)
    if emails is None:
        return list(conn.scalars(stmt.order_by(prospects.c.id)))
    wanted = sorted({e.strip().lower() for e in emails if e and e.strip()})
    ids: set[int] = set()
    for start in range(0, len(wanted), 1000):
        ids.update(conn.scalars(stmt.where(among(conn, prospects.c.email, wanted[start : start + 1000]))))
    return sorted(ids)
