"""Helpers for calling the service and reading its errors."""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from loyalty_service.pb import (
    accounts_pb2,
    accounts_pb2_grpc,
    events_pb2_grpc,
    points_pb2,
    points_pb2_grpc,
    programs_pb2,
    programs_pb2_grpc,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS
OUT_OF_RANGE = grpc.StatusCode.OUT_OF_RANGE

PTX = points_pb2.PointsTransaction
EARN, REDEEM, ADJUST, REVERSE, EXPIRE = (
    PTX.TYPE_EARN,
    PTX.TYPE_REDEEM,
    PTX.TYPE_ADJUST,
    PTX.TYPE_REVERSE,
    PTX.TYPE_EXPIRE,
)
CREDIT, DEBIT = PTX.DIRECTION_CREDIT, PTX.DIRECTION_DEBIT
ACTIVE = accounts_pb2.Account.STATUS_ACTIVE
CLOSED = accounts_pb2.Account.STATUS_CLOSED
MERGED = accounts_pb2.Account.STATUS_MERGED


class Stubs:
    """A stub of each of the service's APIs, on one channel (plain or grpc.aio)."""

    def __init__(self, channel) -> None:
        self.channel = channel
        self.accounts = accounts_pb2_grpc.LoyaltyAccountsStub(channel)
        self.points = points_pb2_grpc.PointsLedgerStub(channel)
        self.programs = programs_pb2_grpc.LoyaltyProgramsStub(channel)
        self.events = events_pb2_grpc.LoyaltyEventsStub(channel)


GRPCURL = str(Path(sys.executable).parent / "grpcurl")


def grpcurl(address: str, *args: str) -> str:
    result = subprocess.run(
        [GRPCURL, "-plaintext", *args[:-1], address, args[-1]] if args else [GRPCURL],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def unique(prefix: str = "cust") -> str:
    return f"{prefix}_{secrets.token_hex(6)}"


@dataclass
class Failure:
    code: grpc.StatusCode
    message: str
    reason: str
    domain: str
    metadata: dict[str, str]
    field_violations: dict[str, str]
    # Every violation, in order (field_violations keeps one per field).
    violations: list[tuple[str, str]]


def failure(error: grpc.RpcError) -> Failure:
    """The code, the one ErrorInfo and any BadRequest field violations of an error."""
    status = rpc_status.from_call(error)
    assert status is not None, f"no rich status in {error}"
    infos, violations, in_order = [], {}, []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = {v.field: v.description for v in bad.field_violations}
            in_order = [(v.field, v.description) for v in bad.field_violations]
    assert len(infos) == 1, f"expected exactly one ErrorInfo in {status}"
    info = infos[0]
    return Failure(
        code=error.code(),
        message=error.details(),
        reason=info.reason,
        domain=info.domain,
        metadata=dict(info.metadata),
        field_violations=violations,
        violations=in_order,
    )


def failed_with(error: grpc.RpcError, code: grpc.StatusCode, reason: str) -> Failure:
    """Asserts the error has this code and reason, in the service's domain."""
    found = failure(error)
    assert (found.code, found.reason) == (code, reason), found
    assert found.domain == "loyalty.vinr.v1"
    assert "Traceback" not in found.message
    return found


def fails(call, request, code: grpc.StatusCode, reason: str) -> Failure:
    """Calls and asserts the call fails with this code and reason."""
    with pytest.raises(grpc.RpcError) as caught:
        call(request)
    return failed_with(caught.value, code, reason)


def account_request(customer: str | None = None, **fields) -> accounts_pb2.CreateAccountRequest:
    """A CreateAccount request in prog_default, for a new customer unless told."""
    fields.setdefault("program", "prog_default")
    return accounts_pb2.CreateAccountRequest(
        customer=unique() if customer is None else customer, **fields
    )


def create_account(accounts, customer: str | None = None, **fields) -> accounts_pb2.Account:
    return accounts.CreateAccount(account_request(customer, **fields))


def post(points, account: str, type_: int, amount: int, direction: int = 0, **fields):
    return points.CreatePointsTransaction(
        points_pb2.CreatePointsTransactionRequest(
            account=account, type=type_, direction=direction, amount=amount, **fields
        )
    )


def reverse(points, transaction_id: str, **fields) -> points_pb2.PointsTransaction:
    return points.ReversePointsTransaction(
        points_pb2.ReversePointsTransactionRequest(id=transaction_id, **fields)
    )


def funded_account(accounts, points, balance: int) -> accounts_pb2.Account:
    account = create_account(accounts)
    if balance:
        post(points, account.id, EARN, balance)
    return accounts.GetAccount(accounts_pb2.GetAccountRequest(id=account.id))


def tiers(*pairs: tuple[str, int]) -> list[programs_pb2.Tier]:
    """A program's tiers, from (name, lifetime points) pairs."""
    return [programs_pb2.Tier(name=name, lifetime_points=points) for name, points in pairs]


def program_request(
    program_id: str = "", request_id: str = "", **fields
) -> programs_pb2.CreateProgramRequest:
    """A CreateProgram request; the program is "Coffee club" in EUR unless `fields` say."""
    fields.setdefault("name", "Coffee club")
    fields.setdefault("currency", "EUR")
    return programs_pb2.CreateProgramRequest(
        program=programs_pb2.Program(**fields), program_id=program_id, request_id=request_id
    )


def create_program(programs, program_id: str = "", **fields) -> programs_pb2.Program:
    return programs.CreateProgram(program_request(program_id, **fields))


def program_update(
    program_id: str, paths: list[str] | None = None, request_id: str = "", **fields
) -> programs_pb2.UpdateProgramRequest:
    """An UpdateProgram request of these fields, with this update mask."""
    return programs_pb2.UpdateProgramRequest(
        program=programs_pb2.Program(id=program_id, **fields),
        update_mask=field_mask_pb2.FieldMask(paths=paths or []),
        request_id=request_id,
    )


def update_program(
    programs, program_id: str, paths: list[str] | None = None, **fields
) -> programs_pb2.Program:
    return programs.UpdateProgram(program_update(program_id, paths, **fields))


def get(accounts, account_id: str) -> accounts_pb2.Account:
    return accounts.GetAccount(accounts_pb2.GetAccountRequest(id=account_id))


def wait_for(condition, timeout: float = 30, interval: float = 0.2) -> None:
    """Waits until `condition()` is true; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise TimeoutError("condition not met")
