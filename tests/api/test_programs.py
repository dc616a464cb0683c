"""LoyaltyPrograms through the real server."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise

import grpc
import psycopg
import pytest
from alembic import command
from alembic.config import Config
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2

from loyalty_service import db
from loyalty_service.pb import (
    accounts_pb2,
    events_pb2,
    programs_pb2,
)
from tests.support import (
    ACTIVE,
    ALREADY_EXISTS,
    CLOSED,
    EARN,
    FAILED_PRECONDITION,
    INVALID,
    MERGED,
    NOT_FOUND,
    Stubs,
    create_account,
    create_program,
    fails,
    get,
    grpcurl,
    post,
    program_request,
    program_update,
    tiers,
    unique,
    update_program,
)

PROGRAM = programs_pb2.Program
P_ACTIVE, P_ARCHIVED = PROGRAM.STATUS_ACTIVE, PROGRAM.STATUS_ARCHIVED
BAD_ID = "is not a valid id (expected ^prog_[A-Za-z0-9_]{1,60}$)"
BAD_CURRENCY = "must be an ISO 4217 code: three uppercase letters"
UPDATABLE = "updatable: name, currency, auto_enroll, tiers, earning_rules, status, hold_policy"


def get_program(programs, program_id: str) -> programs_pb2.Program:
    return programs.GetProgram(programs_pb2.GetProgramRequest(id=program_id))


def enroll(accounts, program: str, **fields) -> accounts_pb2.Account:
    return create_account(accounts, program=program, **fields)


# -- create and get ---------------------------------------------------------------------


def test_create_with_program_id(programs):
    program_id = unique("prog")
    created = create_program(
        programs,
        program_id,
        name="Coffee club",
        currency="EUR",
        auto_enroll=True,
        tiers=tiers(("Bronze", 0), ("Silver", 1000), ("Gold", 5000)),
    )

    assert (created.id, created.name, created.currency, created.auto_enroll) == (
        program_id,
        "Coffee club",
        "EUR",
        True,
    )
    assert [(t.name, t.lifetime_points) for t in created.tiers] == [
        ("Bronze", 0),
        ("Silver", 1000),
        ("Gold", 5000),
    ]
    assert created.status == P_ACTIVE
    assert created.create_time.seconds > 0
    assert created.create_time == created.update_time
    assert get_program(programs, program_id) == created


def test_create_generates_an_id_and_defaults(programs):
    created = create_program(programs, name="Generated", currency="JPY", id="prog_ignored")

    assert re.fullmatch(r"prog_[A-Za-z0-9]{20}", created.id), created.id
    assert (created.name, created.currency, created.auto_enroll) == ("Generated", "JPY", False)
    assert list(created.tiers) == []
    assert created.status == P_ACTIVE
    assert get_program(programs, created.id) == created
    assert create_program(programs, name="Generated", currency="JPY").id != created.id


def test_create_archived(programs, accounts):
    created = create_program(programs, status=P_ARCHIVED)
    assert created.status == P_ARCHIVED
    found = fails(
        accounts.CreateAccount,
        accounts_pb2.CreateAccountRequest(program=created.id),
        FAILED_PRECONDITION,
        "PROGRAM_NOT_ACTIVE",
    )
    assert found.metadata == {"program": created.id, "status": "ARCHIVED"}


def test_default_program_from_the_migration(programs):
    default = get_program(programs, "prog_default")
    assert (default.id, default.name, default.currency, default.auto_enroll) == (
        "prog_default",
        "Default program",
        "USD",
        False,
    )
    assert (list(default.tiers), default.status) == ([], P_ACTIVE)
    assert default.update_time == default.create_time


def test_duplicate_id_is_already_exists(programs):
    program_id = unique("prog")
    first = create_program(programs, program_id, name="First")
    found = fails(
        programs.CreateProgram,
        program_request(program_id, name="Second", currency="USD"),
        ALREADY_EXISTS,
        "PROGRAM_ALREADY_EXISTS",
    )
    assert found.metadata == {"program": program_id}
    assert get_program(programs, program_id) == first
    found = fails(
        programs.CreateProgram,
        program_request("prog_default", name="Again", currency="USD"),
        ALREADY_EXISTS,
        "PROGRAM_ALREADY_EXISTS",
    )
    assert found.metadata == {"program": "prog_default"}


@pytest.mark.parametrize("program_id", ["", "chosen"])
def test_create_retry_returns_the_first_response(programs, program_id):
    program_id = unique("prog") if program_id else ""
    request_id = unique("req")
    first = create_program(programs, program_id, name="Retried", request_id=request_id)
    again = create_program(programs, program_id, name="Retried", request_id=request_id)

    assert again == first
    assert get_program(programs, first.id) == first
    found = fails(
        programs.CreateProgram,
        program_request(program_id, request_id, name="Other name", currency="EUR"),
        INVALID,
        "REQUEST_ID_REUSED",
    )
    assert found.metadata == {"requestId": request_id}


def test_get_malformed(programs):
    # An unknown id: tests/api/test_accounts.py::test_an_unknown_id_is_not_found.
    for bad, description in [("", "is required"), ("loy_abc", BAD_ID), ("prog_a-b", BAD_ID)]:
        found = fails(
            programs.GetProgram, programs_pb2.GetProgramRequest(id=bad), INVALID, "INVALID_ARGUMENT"
        )
        assert found.field_violations == {"id": description}


NUL = "must not contain the character U+0000"
TIER_NAME = "must be 1 to 40 characters"


@pytest.mark.parametrize(
    ("program_id", "fields", "violations"),
    [
        (
            "",
            {"name": "", "currency": ""},
            {"program.name": "is required", "program.currency": "is required"},
        ),
        ("", {"name": "n" * 201}, {"program.name": "is longer than 200 characters"}),
        ("", {"name": "a\x00b"}, {"program.name": NUL}),
        ("", {"currency": "eur"}, {"program.currency": BAD_CURRENCY}),
        ("", {"currency": "EU"}, {"program.currency": BAD_CURRENCY}),
        ("", {"currency": "EURO"}, {"program.currency": BAD_CURRENCY}),
        ("bad", {}, {"program_id": BAD_ID}),
        ("prog_", {}, {"program_id": BAD_ID}),
        ("prog_" + "a" * 61, {}, {"program_id": BAD_ID}),
        ("prog_a.b", {}, {"program_id": BAD_ID}),
        ("", {"status": 7}, {"program.status": "has unknown value 7"}),
        ("", {"tiers": tiers(("", 0))}, {"program.tiers[0].name": TIER_NAME}),
        ("", {"tiers": tiers(("t" * 41, 0))}, {"program.tiers[0].name": TIER_NAME}),
        ("", {"tiers": tiers(("a\x00", 0))}, {"program.tiers[0].name": NUL}),
        ("", {"tiers": tiers(("  ", 0))}, {"program.tiers[0].name": "must not be blank"}),
        ("", {"name": "   "}, {"program.name": "is required"}),
        ("", {"currency": "EUR\n"}, {"program.currency": BAD_CURRENCY}),
        ("prog_x\n", {}, {"program_id": BAD_ID}),
        (
            "",
            {"tiers": tiers(("Gold", 0), ("gold", 10))},
            {"program.tiers[1].name": "repeats the tier name 'gold'"},
        ),
        (
            "",
            {"tiers": tiers(("Gold", 0), ("Gold", 10))},
            {"program.tiers[1].name": "repeats the tier name 'Gold'"},
        ),
        (
            "",
            {"tiers": tiers(("Base", -1))},
            {"program.tiers[0].lifetime_points": "must not be negative"},
        ),
        (
            "",
            {"tiers": tiers(("Base", 0), ("Silver", 100), ("Gold", 100))},
            {
                "program.tiers[2].lifetime_points": (
                    "must be greater than the previous tier's (100)"
                )
            },
        ),
        (
            "",
            {"tiers": tiers(("Base", 0), ("Gold", 500), ("Silver", 100))},
            {
                "program.tiers[2].lifetime_points": (
                    "must be greater than the previous tier's (500)"
                )
            },
        ),
        (
            "",
            {"tiers": tiers(*[(f"T{i}", i) for i in range(21)])},
            {"program.tiers": "has more than 20 tiers"},
        ),
    ],
)
def test_create_validation(programs, program_id, fields, violations):
    fields = {"name": "Valid", "currency": "EUR", **fields}
    found = fails(
        programs.CreateProgram,
        program_request(program_id, **fields),
        INVALID,
        "INVALID_ARGUMENT",
    )
    assert found.field_violations == violations
    assert found.metadata == {"fields": ",".join(violations)}


def test_create_validation_names_every_problem(programs):
    found = fails(
        programs.CreateProgram,
        program_request(
            program_id="nope",
            request_id="r" * 101,
            name="",
            currency="xx",
            tiers=tiers(("A", 5), ("A", 5), ("", -2)),
        ),
        INVALID,
        "INVALID_ARGUMENT",
    )
    assert found.field_violations == {
        "program_id": BAD_ID,
        "program.name": "is required",
        "program.currency": BAD_CURRENCY,
        "program.tiers[1].name": "repeats the tier name 'A'",
        "program.tiers[1].lifetime_points": "must be greater than the previous tier's (5)",
        "program.tiers[2].name": TIER_NAME,
        "program.tiers[2].lifetime_points": "must not be negative",
        "request_id": "is longer than 100 characters",
    }


def test_twenty_tiers_are_allowed(programs):
    created = create_program(programs, tiers=tiers(*[(f"T{i}", i * 10) for i in range(20)]))
    assert [(t.name, t.lifetime_points) for t in created.tiers] == [
        (f"T{i}", i * 10) for i in range(20)
    ]


# -- list -------------------------------------------------------------------------------


def test_list_pages_and_filters(databases, start_replica):
    """On a database of its own, so that the list holds exactly what this test made."""
    replica = start_replica(databases.create())
    with grpc.insecure_channel(replica.address) as channel:
        stubs = Stubs(channel)
        programs, events = stubs.programs, stubs.events
        made = [create_program(programs, f"prog_p{i}", name=f"P{i}") for i in range(5)]
        update_program(programs, "prog_p1", ["status"], status=P_ARCHIVED)
        update_program(programs, "prog_p3", ["status"], status=P_ARCHIVED)

        def page(**fields) -> programs_pb2.ListProgramsResponse:
            return programs.ListPrograms(programs_pb2.ListProgramsRequest(**fields))

        everything = page()
        assert [p.id for p in everything.programs] == [
            "prog_p4",
            "prog_p3",
            "prog_p2",
            "prog_p1",
            "prog_p0",
            "prog_default",
        ]
        assert everything.next_page_token == ""
        assert everything.programs[4] == made[0]

        ids, token, pages = [], "", 0
        while True:
            response = page(page_size=2, page_token=token)
            ids += [p.id for p in response.programs]
            pages += 1
            token = response.next_page_token
            if not token:
                break
        assert pages == 3
        assert ids == [p.id for p in everything.programs]

        archived = page(status=P_ARCHIVED)
        assert [(p.id, p.status) for p in archived.programs] == [
            ("prog_p3", P_ARCHIVED),
            ("prog_p1", P_ARCHIVED),
        ]
        active = page(status=P_ACTIVE, page_size=2)
        assert [p.id for p in active.programs] == ["prog_p4", "prog_p2"]
        rest = page(status=P_ACTIVE, page_size=2, page_token=active.next_page_token)
        assert [p.id for p in rest.programs] == ["prog_p0", "prog_default"]
        assert rest.next_page_token == ""

        found = fails(
            programs.ListPrograms,
            programs_pb2.ListProgramsRequest(page_token=active.next_page_token),
            INVALID,
            "INVALID_ARGUMENT",
        )
        assert found.field_violations == {"page_token": "belongs to a request with other filters"}
        found = fails(
            programs.ListPrograms,
            programs_pb2.ListProgramsRequest(
                status=P_ACTIVE, page_token=active.next_page_token + "x"
            ),
            INVALID,
            "INVALID_ARGUMENT",
        )
        assert found.field_violations == {
            "page_token": "is not a page token issued by this service"
        }
        found = fails(
            programs.ListPrograms,
            programs_pb2.ListProgramsRequest(page_size=-1),
            INVALID,
            "INVALID_ARGUMENT",
        )
        assert found.field_violations == {"page_size": "must not be negative"}
        found = fails(
            programs.ListPrograms,
            programs_pb2.ListProgramsRequest(status=9),
            INVALID,
            "INVALID_ARGUMENT",
        )
        assert found.field_violations == {"status": "has unknown value 9"}

        # Programs write no events.
        assert events.ListEvents(events_pb2.ListEventsRequest()).position == 0


# -- update -----------------------------------------------------------------------------


def test_update_each_path(programs):
    program = create_program(programs, name="Before", currency="EUR", tiers=tiers(("Base", 0)))

    renamed = update_program(programs, program.id, ["name"], name="After", currency="XXX")
    assert (renamed.name, renamed.currency) == ("After", "EUR")  # only the mask's paths
    assert renamed.create_time == program.create_time
    assert (renamed.update_time.seconds, renamed.update_time.nanos) > (
        program.update_time.seconds,
        program.update_time.nanos,
    )

    assert update_program(programs, program.id, ["currency"], currency="GBP").currency == "GBP"
    assert (
        update_program(programs, program.id, ["auto_enroll"], auto_enroll=True).auto_enroll is True
    )
    assert update_program(programs, program.id, ["auto_enroll"]).auto_enroll is False

    tiered = update_program(
        programs, program.id, ["tiers"], tiers=tiers(("Silver", 10), ("Gold", 20))
    )
    assert [(t.name, t.lifetime_points) for t in tiered.tiers] == [("Silver", 10), ("Gold", 20)]
    assert list(update_program(programs, program.id, ["tiers"]).tiers) == []

    assert update_program(programs, program.id, ["status"], status=P_ARCHIVED).status == P_ARCHIVED
    final = update_program(programs, program.id, ["status"], status=P_ACTIVE)
    assert final.status == P_ACTIVE
    assert (final.name, final.currency, final.auto_enroll, list(final.tiers)) == (
        "After",
        "GBP",
        False,
        [],
    )
    assert get_program(programs, program.id) == final


def test_update_without_mask_takes_the_fields_that_are_set(programs):
    program = create_program(programs, name="Plain", currency="EUR", tiers=tiers(("Base", 0)))

    renamed = update_program(programs, program.id, name="Renamed")
    assert (renamed.name, renamed.currency, renamed.auto_enroll) == ("Renamed", "EUR", False)
    assert [(t.name, t.lifetime_points) for t in renamed.tiers] == [("Base", 0)]

    changed = update_program(
        programs,
        program.id,
        currency="CHF",
        auto_enroll=True,
        tiers=tiers(("Base", 0), ("Top", 9)),
        status=P_ARCHIVED,
    )
    assert (changed.name, changed.currency, changed.auto_enroll, changed.status) == (
        "Renamed",
        "CHF",
        True,
        P_ARCHIVED,
    )
    assert [(t.name, t.lifetime_points) for t in changed.tiers] == [("Base", 0), ("Top", 9)]


def test_update_star_replaces_everything(programs):
    program = create_program(programs, auto_enroll=True, tiers=tiers(("Base", 0)))
    replaced = update_program(
        programs, program.id, ["*"], name="Star", currency="SEK", status=P_ACTIVE
    )
    assert (replaced.name, replaced.currency, replaced.auto_enroll, list(replaced.tiers)) == (
        "Star",
        "SEK",
        False,
        [],
    )


def test_update_mask_and_field_errors(programs):
    program = create_program(programs)

    def invalid(paths, **fields) -> dict[str, str]:
        found = fails(
            programs.UpdateProgram,
            programs_pb2.UpdateProgramRequest(
                program=PROGRAM(**fields), update_mask=field_mask_pb2.FieldMask(paths=paths)
            ),
            INVALID,
            "INVALID_ARGUMENT",
        )
        return found.field_violations

    assert invalid(["id"], id=program.id) == {"update_mask": f"cannot update 'id'; {UPDATABLE}"}
    assert invalid([], id=program.id) == {"update_mask": "names nothing to update"}
    assert invalid(["name"], id=program.id) == {"program.name": "is required"}
    assert invalid(["*"], id=program.id) == {
        "program.name": "is required",
        "program.currency": "is required",
        "program.status": "is required",
    }
    assert invalid(["currency"], id=program.id, currency="usd") == {
        "program.currency": BAD_CURRENCY
    }
    assert invalid(["status"], id=program.id, status=5) == {"program.status": "has unknown value 5"}
    assert invalid(["tiers"], id=program.id, tiers=tiers(("A", 1), ("B", 0))) == {
        "program.tiers[1].lifetime_points": "must be greater than the previous tier's (1)"
    }
    assert invalid(["name"], name="x") == {"program.id": "is required"}
    assert invalid(["name"], id="prog_$", name="x") == {"program.id": BAD_ID}
    missing = "prog_" + "m" * 20
    found = fails(
        programs.UpdateProgram,
        programs_pb2.UpdateProgramRequest(program=PROGRAM(id=missing, name="x")),
        NOT_FOUND,
        "PROGRAM_NOT_FOUND",
    )
    assert found.metadata == {"program": missing}
    assert get_program(programs, program.id) == program


def test_update_mask_lists_every_unknown_path(programs):
    program = create_program(programs)
    found = fails(
        programs.UpdateProgram,
        program_update(program.id, ["name", "rules", "create_time"], name="x"),
        INVALID,
        "INVALID_ARGUMENT",
    )
    # Both under one field path; BadRequest keeps each violation, the dict the last.
    assert found.message == (
        f"update_mask: cannot update 'create_time'; {UPDATABLE};"
        f" update_mask: cannot update 'rules'; {UPDATABLE}"
    )


def test_update_retry_returns_the_first_response(programs):
    program = create_program(programs)
    request_id = unique("req")
    first = update_program(programs, program.id, ["name"], request_id=request_id, name="Once")
    update_program(programs, program.id, ["name"], name="Later")
    again = update_program(programs, program.id, ["name"], request_id=request_id, name="Once")

    assert again == first
    assert get_program(programs, program.id).name == "Later"
    found = fails(
        programs.UpdateProgram,
        program_update(program.id, ["name"], request_id, name="Twice"),
        INVALID,
        "REQUEST_ID_REUSED",
    )
    assert found.metadata == {"requestId": request_id}


@pytest.mark.parametrize("closed", [False, True], ids=["active", "closed"])
def test_currency_is_locked_once_an_account_exists(programs, accounts, closed):
    program = create_program(programs, currency="EUR")
    assert update_program(programs, program.id, ["currency"], currency="GBP").currency == "GBP"

    account = enroll(accounts, program.id)
    if closed:  # a closed account locks it too
        accounts.CloseAccount(accounts_pb2.CloseAccountRequest(id=account.id))
    found = fails(
        programs.UpdateProgram,
        program_update(program.id, ["currency"], currency="USD"),
        FAILED_PRECONDITION,
        "CURRENCY_LOCKED",
    )
    assert found.metadata == {"program": program.id, "currency": "GBP", "requested": "USD"}
    # The same currency is no change; the other fields stay updatable.
    same = update_program(
        programs, program.id, ["currency", "name"], currency="GBP", name="Renamed"
    )
    assert (same.currency, same.name) == ("GBP", "Renamed")
    assert get_program(programs, program.id).currency == "GBP"


def test_archived_program_takes_no_new_accounts(programs, accounts, points):
    program = create_program(programs)
    member = enroll(accounts, program.id)
    duplicate = enroll(accounts, program.id)
    post(points, member.id, EARN, 100)

    archived = update_program(programs, program.id, ["status"], status=P_ARCHIVED)
    assert archived.status == P_ARCHIVED
    found = fails(
        accounts.CreateAccount,
        accounts_pb2.CreateAccountRequest(program=program.id, customer=unique()),
        FAILED_PRECONDITION,
        "PROGRAM_NOT_ACTIVE",
    )
    assert found.metadata == {"program": program.id, "status": "ARCHIVED"}

    # Existing accounts keep working.
    assert post(points, member.id, EARN, 50).points_after == 150
    assert get(accounts, member.id).balance == 150
    merged = accounts.MergeAccounts(
        accounts_pb2.MergeAccountsRequest(source=duplicate.id, target=member.id)
    )
    assert (merged.target.balance, merged.source.status) == (150, MERGED)
    assert accounts.CloseAccount(accounts_pb2.CloseAccountRequest(id=member.id)).status == CLOSED
    assert accounts.ReopenAccount(accounts_pb2.ReopenAccountRequest(id=member.id)).status == ACTIVE

    update_program(programs, program.id, ["status"], status=P_ACTIVE)
    assert enroll(accounts, program.id).program == program.id


def test_concurrent_updates_leave_a_consistent_program(programs):
    """20 threads: half change the tiers, half the name; the row lock serializes them, so the
    result holds the last of each and nothing is lost or mixed."""
    program = create_program(programs, name="Start", tiers=tiers(("Base", 0)))

    def change(i: int) -> tuple[int, programs_pb2.Program]:
        if i % 2:
            return i, update_program(programs, program.id, ["name"], name=f"Name {i}")
        return i, update_program(
            programs, program.id, ["tiers"], tiers=tiers((f"A{i}", i), (f"B{i}", 100 + i))
        )

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(change, range(20)))

    def time_of(result: tuple[int, programs_pb2.Program]) -> tuple[int, int]:
        return result[1].update_time.seconds, result[1].update_time.nanos

    ordered = sorted(results, key=time_of)
    assert len({time_of(r) for r in results}) == 20
    final = get_program(programs, program.id)
    assert final == ordered[-1][1]
    last_name = max((r for r in results if r[0] % 2), key=time_of)[0]
    last_tiers = max((r for r in results if r[0] % 2 == 0), key=time_of)[0]
    assert final.name == f"Name {last_name}"
    assert [(t.name, t.lifetime_points) for t in final.tiers] == [
        (f"A{last_tiers}", last_tiers),
        (f"B{last_tiers}", 100 + last_tiers),
    ]
    # Each response is the program as its own update left it: the previous one's state
    # with one field changed.
    for before, after in pairwise(ordered):
        unchanged = "tiers" if after[0] % 2 else "name"
        assert getattr(after[1], unchanged) == getattr(before[1], unchanged)


def test_health_and_reflection_know_the_service(service):
    assert service.health("vinr.loyalty.v1.LoyaltyPrograms") == (
        health_pb2.HealthCheckResponse.SERVING
    )
    assert "vinr.loyalty.v1.LoyaltyPrograms" in grpcurl(service.address, "list").split()


def test_grpcurl_create_program_as_in_the_readme(service):
    program_id = unique("prog_coffee")
    # The README's request, with an id of its own.
    body = (
        '{"program_id": "prog_coffee", "program": {"name": "Coffee club",'
        ' "currency": "EUR", "tiers": [{"name": "Silver", "lifetime_points": 0},'
        ' {"name": "Gold", "lifetime_points": 5000}]}, "request_id": "create-prog_coffee"}'
    ).replace("prog_coffee", program_id)
    created = json.loads(
        grpcurl(service.address, "-d", body, "vinr.loyalty.v1.LoyaltyPrograms/CreateProgram")
    )
    assert {key: created[key] for key in ("id", "name", "currency", "tiers", "status")} == {
        "id": program_id,
        "name": "Coffee club",
        "currency": "EUR",
        "tiers": [{"name": "Silver"}, {"name": "Gold", "lifetime_points": "5000"}],
        "status": "STATUS_ACTIVE",
    }


def test_migration_0003_fills_in_existing_programs(databases):
    """Programs from before 0003 get USD, no tiers, ACTIVE, their create time as update time
    and a paging position; the migration also goes down and up again."""
    url = databases.create_empty()
    config = Config()
    config.set_main_option("script_location", str(db.MIGRATIONS))
    config.set_main_option("sqlalchemy.url", db.sqlalchemy_url(url).replace("%", "%%"))
    command.upgrade(config, "0002")
    with psycopg.connect(db.libpq_url(url), autocommit=True) as conn:
        conn.execute("INSERT INTO programs (id, name) VALUES ('prog_old', 'Old')")
    command.upgrade(config, "0003")
    command.downgrade(config, "0002")
    command.upgrade(config, "head")
    with psycopg.connect(db.libpq_url(url), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT id, currency, auto_enroll, tiers, status, update_time = create_time, seq"
            " FROM programs ORDER BY seq"
        ).fetchall()
        assert rows == [
            ("prog_default", "USD", False, [], "ACTIVE", True, 1),
            ("prog_old", "USD", False, [], "ACTIVE", True, 2),
        ]
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("UPDATE programs SET status = 'DELETED' WHERE id = 'prog_old'")
