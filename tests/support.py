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
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from loyalty_service.pb import accounts_pb2, points_pb2

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


def fails(call, request, code: grpc.StatusCode, reason: str) -> Failure:
    """Calls and asserts the call fails with this code and reason."""
    with pytest.raises(grpc.RpcError) as caught:
        call(request)
    found = failure(caught.value)
    assert (found.code, found.reason) == (code, reason), found
    assert found.domain == "loyalty.vinr.v1"
    assert "Traceback" not in found.message
    return found


def create_account(accounts, customer: str | None = None, **fields) -> accounts_pb2.Account:
    return accounts.CreateAccount(
        accounts_pb2.CreateAccountRequest(
            program="prog_default",
            customer=unique() if customer is None else customer,
            **fields,
        )
    )


def post(points, account: str, type_: int, amount: int, direction: int = 0, **fields):
    return points.CreatePointsTransaction(
        points_pb2.CreatePointsTransactionRequest(
            account=account, type=type_, direction=direction, amount=amount, **fields
        )
    )


def funded_account(accounts, points, balance: int) -> accounts_pb2.Account:
    account = create_account(accounts)
    if balance:
        post(points, account.id, EARN, balance)
    return accounts.GetAccount(accounts_pb2.GetAccountRequest(id=account.id))


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
