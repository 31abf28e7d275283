"""Prospect import: validation, normalisation and dedupe, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import event, insert, select

from relance import prospects as prospects_module
from relance.errors import ProspectError
from relance.privacy import erase_prospect
from relance.prospects import (
    find_prospects,
    import_csv,
    normalise_linkedin_url,
    normalise_row,
)
from relance.store import Store, prospects
from relance.suppression import list_suppressions, suppress, suppressed_ids

NOW = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def write(tmp_path: Path, content: str, name: str = "prospects.csv", encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode(encoding))
    return path


def all_prospects(store: Store) -> list[dict]:
    with store.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(prospects).order_by(prospects.c.id))]


def by_email(store: Store) -> dict[str, dict]:
    return {p["email"]: p for p in all_prospects(store) if p["email"]}


def rejected(report) -> list[tuple[int, str | None]]:
    return [(r.row_number, r.column) for r in report.rejected]


# --------------------------------------------------------------------------------------------
# import_csv


def test_french_headers_with_accents_and_semicolons(store: Store, tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "\ufeffPrénom;NOM;Courriel;Société;Poste;Téléphone;Pays;Fuseau horaire;Langue;Secteur d'activité\n"
        "Élodie;Martin;Elodie.Martin@Acme.FR;Acme SAS;DAF;06 12 34 56 78;;;Français;SaaS\n"
        "John;O'Neil;john@initech.co.uk;Initech Ltd;CFO;+44 20 7946 0958;uk;;en-gb;Fintech\n",
        name="salon-2026.csv",
    )
    report = import_csv(store, path, now=NOW)
    assert (report.imported, report.updated, report.duplicates, report.rejected) == (2, 0, 0, [])
    assert report.total == 2
    rows = by_email(store)
    elodie = rows["elodie.martin@acme.fr"]
    assert elodie["first_name"] == "Élodie"  # accents are kept
    assert elodie["company"] == "Acme SAS"
    assert elodie["title"] == "DAF"
    assert elodie["phone"] == "+33612345678"
    assert (elodie["country"], elodie["timezone"], elodie["language"]) == ("FR", "Europe/Paris", "fr")
    assert elodie["account_key"] == "acme.fr"
    assert elodie["attributes"] == {"Secteur d'activité": "SaaS"}
    assert elodie["source"] == "salon-2026.csv"
    assert elodie["created_at"] == elodie["updated_at"] == NOW
    assert elodie["erased_at"] is None
    john = rows["john@initech.co.uk"]
    assert (john["phone"], john["country"], john["timezone"], john["language"]) == (
        "+442079460958",
        "GB",
        "Europe/London",
        "en-GB",
    )


@pytest.fixture(params=[0, 1], ids=["here", "worker"])
def workers(request, monkeypatch) -> int:
    """Rows validated in this process, or by a worker process two records at a time (so
    results come back over several chunks that must stay in file order)."""
    if request.param:
        monkeypatch.setattr(prospects_module, "_CHUNK_ROWS", 2)
    return request.param


def test_broken_rows_are_reported_by_file_line_and_column_and_the_rest_imported(
    store: Store, tmp_path: Path, workers: int
) -> None:
    path = write(
        tmp_path,
        "email,first_name,last_name,phone,linkedin,timezone\n"  # line 1
        "ok1@acme.fr,Ann,A,,,\n"  # 2
        "not-an-email,Bob,B,,,\n"  # 3
        "ok2@acme.fr,Cid,C,12,,\n"  # 4
        "ok3@acme.fr,Dan,D,,,Mars/Olympus_Mons\n"  # 5
        "ok4@acme.fr,Eve,E,,https://www.linkedin.com/company/acme/,\n"  # 6
        "ok5@acme.fr,Fay,F,,https://example.com/in/fay,\n"  # 7
        ",,,,,\n"  # 8: blank, skipped
        ",Gus,G,,,\n"  # 9: nothing to reach him by
        "ok6@acme.fr,,,,,\n"  # 10: no name
        "ok7@acme.fr,Hal,H,+33 1 23 45 67 89,linkedin.com/in/hal-h,europe/paris\n"  # 11
        "ok8@acme.fr,Ian,I,,,,shifted\n"  # 12: one value too many, the columns are off
        "ok9@acme.fr,Jo\n",  # 13: missing trailing values are empty
    )
    report = import_csv(store, path, now=NOW, workers=workers)
    assert rejected(report) == [
        (3, "email"),
        (4, "phone"),
        (5, "timezone"),
        (6, "linkedin"),
        (7, "linkedin"),
        (9, None),
        (10, "first_name"),
        (12, None),
    ]
    assert "company page" in report.rejected[3].reason
    assert "Mars/Olympus_Mons" in report.rejected[2].reason
    assert report.rejected[0].raw["email"] == "not-an-email"
    assert report.imported == 3 and report.total == 11
    hal = by_email(store)["ok7@acme.fr"]
    assert hal["linkedin_url"] == "https://www.linkedin.com/in/hal-h"
    assert hal["timezone"] == "Europe/Paris"
    assert set(by_email(store)) == {"ok1@acme.fr", "ok7@acme.fr", "ok9@acme.fr"}


def test_hostile_fields_stay_inert_data_and_lines_count_multiline_records(store: Store, tmp_path: Path, workers: int) -> None:
    path = write(
        tmp_path,
        "email,first_name,last_name,company,notes\r\n"
        '"a@acme.fr","Jean\r\nBcc: victim@example.org","Du\x00pont\t","{{ 7*7 }} {% raw %}","line1\nline2"\r\n'
        "broken,X,Y,Z,W\r\n",
    )
    report = import_csv(store, path, now=NOW, workers=workers)
    assert report.imported == 1
    assert rejected(report) == [(5, "email")]  # the first record spans lines 2 to 4
    jean = by_email(store)["a@acme.fr"]
    assert jean["first_name"] == "Jean Bcc: victim@example.org"
    assert jean["last_name"] == "Du pont"
    assert jean["company"] == "{{ 7*7 }} {% raw %}"
    assert jean["attributes"] == {"notes": "line1 line2"}


def test_excel_cp1252_file(store: Store, tmp_path: Path) -> None:
    path = write(tmp_path, "Prénom;Nom;E-mail\nFrançois;Lefèvre;f.lefevre@acme.fr\n", encoding="cp1252")
    report = import_csv(store, path, now=NOW)
    assert report.imported == 1, report.rejected
    assert by_email(store)["f.lefevre@acme.fr"]["first_name"] == "François"


@pytest.mark.parametrize("batch_size", [1, 1000])
def test_dedupe_within_the_file_and_reimport_updates(store: Store, tmp_path: Path, batch_size: int) -> None:
    first = write(
        tmp_path,
        "email,first_name,last_name,title,linkedin,Secteur\n"
        "jean@acme.fr,Jean,Dupont,DAF,,SaaS\n"
        "JEAN@ACME.FR,Jean,Dupont,CFO,,\n"  # same email
        "marie@acme.fr,Marie,Curie,,https://www.linkedin.com/in/marie-curie,\n"
        ",Marie,C,,http://fr.linkedin.com/in/Marie-Curie/?trk=abc,\n",  # same profile
        name="first.csv",
    )
    report = import_csv(store, first, now=NOW, batch_size=batch_size)
    assert (report.imported, report.updated, report.duplicates, report.rejected) == (2, 0, 2, [])
    assert by_email(store)["jean@acme.fr"]["title"] == "DAF"  # the first row wins

    later = NOW + timedelta(days=1)
    second = write(
        tmp_path,
        "email,first_name,last_name,title,phone,linkedin,Secteur,Taille\n"
        "jean@acme.fr,Jean,,CEO,06 12 34 56 78,,,50\n"  # empty values do not blank stored ones
        ",Marie,,,,linkedin.com/in/marie-curie/,Santé,\n"  # found by LinkedIn URL
        "jean@acme.fr,Jean,Dupont,CTO,,,,\n"  # duplicate within this file
        "marie@acme.fr,Marie,Curie,,,https://www.linkedin.com/in/someone-else,,\n"  # now matched by email
        "jean@acme.fr,Jean,,,,https://www.linkedin.com/in/marie-curie,,\n"  # a duplicate already
        "new@acme.fr,New,Person,,,,,\n",
        name="second.csv",
    )
    report = import_csv(store, second, now=later, batch_size=batch_size)
    assert (report.imported, report.updated, report.duplicates) == (1, 2, 3)
    assert report.rejected == []
    rows = by_email(store)
    assert len(all_prospects(store)) == 3
    jean = rows["jean@acme.fr"]
    assert (jean["title"], jean["last_name"], jean["phone"]) == ("CEO", "Dupont", "+33612345678")
    assert jean["attributes"] == {"Secteur": "SaaS", "Taille": "50"}
    assert jean["created_at"] == NOW and jean["updated_at"] == later
    assert jean["source"] == "first.csv"  # where the prospect came from first
    marie = rows["marie@acme.fr"]
    assert report.prospect_ids == [jean["id"], marie["id"], rows["new@acme.fr"]["id"]]  # file order
    assert marie["attributes"] == {"Secteur": "Santé", "Taille": ""}
    assert marie["linkedin_url"] == "https://www.linkedin.com/in/marie-curie"


def test_call_list_rows_dedupe_by_phone_and_name(store: Store, tmp_path: Path) -> None:
    content = (
        "Téléphone;Prénom;Nom;Poste\n"
        "01 23 45 67 89;Jean;Dupont;DAF\n"
        "+33 1 23 45 67 89;JEAN;dupont;\n"  # same person: a duplicate
        "01 23 45 67 89;Marie;Curie;CFO\n"  # same switchboard, another person
    )
    report = import_csv(store, write(tmp_path, content), now=NOW)
    assert (report.imported, report.duplicates) == (2, 1)
    report = import_csv(store, write(tmp_path, content.replace("DAF", "CEO")), now=NOW)
    assert (report.imported, report.updated, report.duplicates) == (0, 2, 1)
    assert sorted(p["title"] for p in all_prospects(store)) == ["CEO", "CFO"]


def test_row_naming_two_different_prospects_is_rejected(store: Store, tmp_path: Path) -> None:
    import_csv(
        store,
        write(
            tmp_path,
            "email,first_name,linkedin\n"
            "jean@acme.fr,Jean,\n"
            "marie@acme.fr,Marie,https://www.linkedin.com/in/marie-curie\n",
        ),
        now=NOW,
    )
    report = import_csv(
        store,
        write(tmp_path, "email,first_name,linkedin\njean@acme.fr,Jean,linkedin.com/in/marie-curie\n", name="b.csv"),
        now=NOW,
    )
    assert rejected(report) == [(2, "linkedin")]
    assert "prospect #" in report.rejected[0].reason
    assert len(all_prospects(store)) == 2


def test_one_lookup_query_per_batch(store: Store, tmp_path: Path) -> None:
    lines = ["email,first_name"] + [f"p{i}@acme.fr,P{i}" for i in range(200)]
    path = write(tmp_path, "\n".join(lines) + "\n")
    import_csv(store, path, now=NOW)  # half of the second import is then updates
    lines += [f"q{i}@acme.fr,Q{i}" for i in range(200)]
    path = write(tmp_path, "\n".join(lines) + "\n")
    statements: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        statements.append(statement)

    event.listen(store.engine, "before_cursor_execute", record)
    seen: list[int] = []
    try:
        report = import_csv(store, path, now=NOW, batch_size=50, progress=seen.append)
    finally:
        event.remove(store.engine, "before_cursor_execute", record)
    assert (report.imported, report.updated) == (200, 200)
    lookups = [s for s in statements if s.lstrip().upper().startswith("SELECT") and "FROM prospects" in s]
    # One lookup of existing prospects per batch, and one reading the new ids after an insert.
    assert len(lookups) == 4 + 4 * 2
    assert len(report.prospect_ids) == len(set(report.prospect_ids)) == 400
    assert seen[-1] == 400 and seen == sorted(seen)


def test_a_concurrent_insert_between_lookup_and_write_does_not_lose_the_batch(
    store: Store, tmp_path: Path
) -> None:
    path = write(tmp_path, "email,first_name,title\na@acme.fr,A,DAF\nb@acme.fr,B,CFO\nc@acme.fr,C,CEO\n")
    raced: list[bool] = []

    def webhook_inserts_b(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        if not raced and statement.lstrip().upper().startswith("SELECT") and "FROM prospects" in statement:
            raced.append(True)
            with store.engine.begin() as other:  # another connection, committed at once
                other.execute(
                    insert(prospects).values(
                        email="b@acme.fr", first_name="B", attributes={}, created_at=NOW, updated_at=NOW
                    )
                )

    event.listen(store.engine, "after_cursor_execute", webhook_inserts_b)
    try:
        report = import_csv(store, path, now=NOW)
    finally:
        event.remove(store.engine, "after_cursor_execute", webhook_inserts_b)
    assert raced
    assert (report.imported, report.updated, report.rejected) == (2, 1, [])
    rows = by_email(store)
    assert len(rows) == 3 and rows["b@acme.fr"]["title"] == "CFO"


def test_unreadable_files_raise_with_the_file_name(store: Store, tmp_path: Path) -> None:
    with pytest.raises(ProspectError, match="missing.csv"):
        import_csv(store, tmp_path / "missing.csv", now=NOW)
    with pytest.raises(ProspectError, match="empty.csv.*header"):
        import_csv(store, write(tmp_path, "", name="empty.csv"), now=NOW)
    with pytest.raises(ProspectError, match="names.csv.*no email, LinkedIn or phone column"):
        import_csv(store, write(tmp_path, "first_name,last_name\nJean,Dupont\n", name="names.csv"), now=NOW)
    assert all_prospects(store) == []


def test_large_files_are_validated_by_one_worker_per_other_core(tmp_path: Path, monkeypatch) -> None:
    from relance.prospects import _PARALLEL_FROM_BYTES, _workers_for

    small, large = write(tmp_path, "email\na@acme.fr\n", name="small.csv"), tmp_path / "large.csv"
    large.write_bytes(b"x" * _PARALLEL_FROM_BYTES)
    for cores, expected in ((1, 0), (2, 1), (4, 3), (16, 3)):
        monkeypatch.setattr("os.cpu_count", lambda cores=cores: cores)
        assert (_workers_for(small), _workers_for(large)) == (0, expected)


def test_import_never_removes_a_suppression(store: Store, tmp_path: Path) -> None:
    with store.begin() as conn:
        suppress(conn, "email", "Jean@Acme.fr", "unsubscribed", source="brevo", now=NOW)
    report = import_csv(store, write(tmp_path, "email,first_name\njean@acme.fr,Jean\n"), now=NOW)
    assert report.imported == 1  # suppressed prospects are imported, never contacted
    report = import_csv(store, write(tmp_path, "email,first_name\njean@acme.fr,Jean\n"), now=NOW)
    assert report.updated == 1
    with store.connect() as conn:
        assert [(s["kind"], s["value"], s["reason"]) for s in list_suppressions(conn)] == [
            ("email", "jean@acme.fr", "unsubscribed")
        ]
        rows = conn.execute(select(prospects)).all()
        assert suppressed_ids(conn, rows) == {rows[0].id: "unsubscribed (email)"}


def test_find_prospects(store: Store, tmp_path: Path) -> None:
    import_csv(
        store,
        write(
            tmp_path,
            "email,first_name,company,country,Secteur\n"
            "a@acme.fr,A,Acme,FR,SaaS\n"
            "b@acme.fr,B,Acme,BE,Santé\n"
            "c@globex.com,C,Globex,FR,SaaS\n",
        ),
        now=NOW,
    )
    with store.begin() as conn:
        ids = {p: i for i, p in conn.execute(select(prospects.c.id, prospects.c.email))}
        assert find_prospects(conn, emails=[" A@ACME.FR", "c@globex.com", "nobody@x.fr"]) == sorted(
            [ids["a@acme.fr"], ids["c@globex.com"]]
        )
        assert find_prospects(conn, where={"country": "fr"}) == [ids["a@acme.fr"], ids["c@globex.com"]]
        assert find_prospects(conn, where={"attributes.Secteur": "Santé"}) == [ids["b@acme.fr"]]
        assert find_prospects(conn, where={"account_key": "acme.fr", "attributes.Secteur": "SaaS"}) == [
            ids["a@acme.fr"]
        ]
        assert find_prospects(conn, emails=["a@acme.fr"], where={"country": "BE"}) == []
        assert len(find_prospects(conn)) == 3
        with pytest.raises(ProspectError, match="cannot filter on 'erased_at'"):
            find_prospects(conn, where={"erased_at": "x"})
        erase_prospect(conn, ids["a@acme.fr"], NOW)
        assert find_prospects(conn, where={"country": "FR"}) == [ids["c@globex.com"]]


# --------------------------------------------------------------------------------------------
# normalise_row (no store)


def norm(**row: str) -> dict:
    return normalise_row(row, default_country="FR", default_timezone="Europe/Paris")


@pytest.mark.parametrize(
    ("email", "company", "key"),
    [
        ("jean@acme.fr", "Whatever", "acme.fr"),
        ("jean@gmail.com", "Société Générale S.A.", "societe generale"),
        ("jean@yahoo.fr", "ACME, Inc.", "acme"),
        ("jean@hotmail.co.uk", "Initech   Ltd", "initech"),
        ("jean@orange.fr", "Crème  Brûlée SARL", "creme brulee"),
        ("jean@outlook.com", "Big Data GmbH", "big data"),
        ("jean@protonmail.com", "SA", "sa"),  # a suffix alone stays a name
        ("jean@laposte.net", "", None),
        ("jean@sales.globex.com", "Globex", "sales.globex.com"),
    ],
)
def test_account_key_free_mail_vs_company_domain(email: str, company: str, key: str | None) -> None:
    assert norm(email=email, first_name="Jean", company=company)["account_key"] == key


@pytest.mark.parametrize(
    "url",
    [
        "https://www.linkedin.com/in/jean-dupont-12ab",
        "http://linkedin.com/in/jean-dupont-12ab/",
        "www.linkedin.com/in/Jean-Dupont-12ab?utm_source=share",
        "linkedin.com/in/jean-dupont-12ab/",
        "https://fr.linkedin.com/in/jean-dupont-12ab/details/experience/",
        "  https://www.linkedin.com/in/jean-dupont-12ab#about  ",
    ],
)
def test_linkedin_urls_are_canonical(url: str) -> None:
    assert normalise_linkedin_url(url) == "https://www.linkedin.com/in/jean-dupont-12ab"


def test_linkedin_slug_with_accents_is_stable() -> None:
    assert normalise_linkedin_url("linkedin.com/in/Fran%C3%A7ois") == normalise_linkedin_url(
        "https://www.linkedin.com/in/françois/"
    )


@pytest.mark.parametrize(
    "url",
    [
        "https://www.linkedin.com/company/acme/",
        "https://www.linkedin.com/school/hec-paris",
        "https://example.com/in/jean",
        "https://linkedin.com.evil.example/in/jean",
        "https://www.linkedin.com/in/",
        "https://www.linkedin.com/feed/",
        "ftp://linkedin.com/in/jean",
        "jean-dupont",
    ],
)
def test_bad_linkedin_urls_are_rejected(url: str) -> None:
    with pytest.raises(ProspectError) as err:
        norm(linkedin=url, first_name="Jean")
    assert err.value.key == "linkedin"


@pytest.mark.parametrize(
    ("row", "country", "zone"),
    [
        ({"phone": "+1 212 555 0123"}, "US", "America/New_York"),
        ({"phone": "+1 416 555 0199"}, "CA", "America/Toronto"),
        ({"phone": "+44 7400 123456"}, "GB", "Europe/London"),  # several zones, the country's wins
        ({"phone": "0612345678"}, "FR", "Europe/Paris"),
        ({"phone": "02 555 12 12", "country": "be"}, "BE", "Europe/Brussels"),
        ({"country": "CA"}, "CA", "America/Toronto"),
        ({"country": "Suisse"}, "CH", "Europe/Zurich"),
        ({"country": "JP"}, "JP", "Asia/Tokyo"),
        ({"country": "KE"}, "KE", "Africa/Nairobi"),  # not in the map: phonenumbers knows it
        ({"country": "FR", "timezone": "america/new_york"}, "FR", "America/New_York"),
        ({}, "FR", "Europe/Paris"),
    ],
)
def test_time_zone_from_row_then_phone_then_country_then_default(row: dict, country: str, zone: str) -> None:
    values = norm(email="a@acme.fr", first_name="A", **row)
    assert (values["country"], values["timezone"]) == (country, zone)


def test_default_time_zone_when_nothing_says() -> None:
    row = {"email": "a@acme.fr", "nom": "A", "pays": "KI"}  # Kiribati spans three zones
    values = normalise_row(row, default_country="FR", default_timezone="UTC")
    assert values["timezone"] == "UTC"


@pytest.mark.parametrize(
    ("row", "column"),
    [
        ({"E-mail": "jean@@acme.fr"}, "E-mail"),
        ({"Courriel": "jean@acme.fr", "Téléphone": "+33 6 12"}, "Téléphone"),
        ({"Courriel": "jean@acme.fr", "Fuseau": "Europe/Pariss"}, "Fuseau"),
        ({"Courriel": "jean@acme.fr", "Fuseau": "GMT+1"}, "Fuseau"),
        ({"Courriel": "jean@acme.fr", "Pays": "Narnia"}, "Pays"),
        ({"Courriel": "jean@acme.fr", "Langue": "klingon!"}, "Langue"),
        ({"Courriel": "jean@acme.fr", "Poste": "x" * 301}, "Poste"),
    ],
)
def test_first_problem_names_the_column(row: dict, column: str) -> None:
    with pytest.raises(ProspectError) as err:
        normalise_row({"Prénom": "Jean", **row}, default_country="FR", default_timezone="Europe/Paris")
    assert err.value.key == column


def test_header_spellings_and_first_non_empty_phone_column() -> None:
    values = normalise_row(
        {"E-Mail": "A@Acme.fr", "PRENOM": "Ana", "Last Name": "B", "Téléphone": "", "Mobile": "+33 6 12 34 56 78",
         "Job Title": "DAF", "Entreprise": "Acme", "LinkedIn URL": "", "Time Zone": "", "Country": ""},
        default_country="FR", default_timezone="Europe/Paris",
    )  # fmt: skip
    assert values["email"] == "a@acme.fr"
    assert (values["first_name"], values["last_name"], values["title"], values["company"]) == ("Ana", "B", "DAF", "Acme")
    assert values["phone"] == "+33612345678"
    assert values["attributes"] == {}


def test_phone_shortcut_agrees_with_phonenumbers_parse() -> None:
    """normalise_phone builds common shapes directly; it must read them as parse() does."""
    import random

    import phonenumbers

    from relance.prospects import normalise_phone

    def reference(raw: str, region: str) -> str | None:
        try:
            number = phonenumbers.parse(raw, region)
        except phonenumbers.NumberParseException:
            return None
        return phonenumbers.format_number(number, 0) if phonenumbers.is_valid_number(number) else None

    def ours(raw: str, region: str) -> str | None:
        try:
            return phonenumbers.format_number(normalise_phone(raw, region), 0)
        except ValueError:
            return None

    rnd = random.Random(7)
    regions = ["FR", "GB", "BE", "CH", "DE", "NL", "AT", "IE", "PT", "ES", "IT", "US", "CA", "LU", "MC", "JP"]
    cases = []
    for region in regions:
        for kind in (phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE):
            example = phonenumbers.example_number_for_type(region, kind)
            for fmt in (0, 1, 2):  # E.164, international, national
                text = phonenumbers.format_number(example, fmt)
                cases.append((text, region))
                for _ in range(40):  # one digit changed: often invalid, sometimes another number
                    pos = rnd.choice([i for i, c in enumerate(text) if c.isdigit()])
                    cases.append((text[:pos] + str(rnd.randrange(10)) + text[pos + 1 :], region))
    cases += [("+33 (0)6 12 34 56 78", "FR"), ("0033 6 12 34 56 78", "FR"), ("+0612345678", "FR"),
              ("+1 1 212 555 0123", "US"), ("+39 06 1234 5678", "IT"), ("06.12.34.56.78", "FR")]  # fmt: skip
    for raw, region in cases:
        assert ours(raw, region) == reference(raw, region), (raw, region)


def test_invisible_direction_overrides_are_removed() -> None:
    values = norm(email="a@acme.fr", first_name="Jean\u202eenoD\u202c", company="\ufeffAcme")
    assert (values["first_name"], values["company"]) == ("JeanenoD", "Acme")
