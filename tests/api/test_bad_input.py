"""Bad input gets INVALID_ARGUMENT naming the field, and writes nothing."""

from __future__ import annotations

import pytest
from google.protobuf import field_mask_pb2

from loyalty_service.pb import accounts_pb2, points_pb2
from tests.support import (
    ADJUST,
    CREDIT,
    DEBIT,
    EARN,
    INVALID,
    REDEEM,
    REVERSE,
    create_account,
    fails,
    funded_account,
    get,
    post,
    unique,
)

Origin = points_pb2.Origin


def invalid(call, request, *fields: str) -> None:
    found = fails(call, request, INVALID, "INVALID_ARGUMENT")
    assert set(found.field_violations) == set(fields), found.field_violations
    for name in fields:
        assert name in found.message


@pytest.mark.parametrize(
    ("request_fields", "bad_fields"),
    [
        ({}, ["type", "amount"]),
        ({"type": EARN, "amount": 0}, ["amount"]),
        ({"type": EARN, "amount": -5}, ["amount"]),
        ({"type": EARN, "amount": 2**62}, ["amount"]),
        ({"type": EARN, "amount": 1_000_000_001}, ["amount"]),
        ({"type": 42, "amount": 1}, ["type"]),
        ({"type": EARN, "amount": 1, "direction": 9}, ["direction"]),
        ({"type": ADJUST, "amount": 1}, ["direction"]),
        ({"type": EARN, "amount": 1, "direction": DEBIT}, ["direction"]),
        ({"type": REDEEM, "amount": 1, "direction": CREDIT}, ["direction"]),
        ({"type": REVERSE, "amount": 1}, ["type"]),
        ({"type": EARN, "amount": 1, "reason": "x" * 501}, ["reason"]),
        ({"type": EARN, "amount": 1, "origin": Origin(kind=7)}, ["origin.kind"]),
        ({"type": EARN, "amount": 1, "origin": Origin(kind=Origin.KIND_MERGE)}, ["origin.kind"]),
        ({"type": EARN, "amount": 1, "origin": Origin(id="o" * 256)}, ["origin.id"]),
        ({"type": EARN, "amount": 1, "metadata": {f"k{i}": "v" for i in range(51)}}, ["metadata"]),
        ({"type": EARN, "amount": 1, "metadata": {"k" * 41: "v"}}, [f"metadata[{'k' * 40}]"]),
        ({"type": EARN, "amount": 1, "metadata": {"k": "v" * 501}}, ["metadata[k]"]),
        ({"type": EARN, "amount": 1, "metadata": {"": "v"}}, ["metadata[]"]),
        ({"type": EARN, "amount": 1, "request_id": "r" * 101}, ["request_id"]),
        # PostgreSQL text cannot hold U+0000.
        ({"type": EARN, "amount": 1, "reason": "bad\x00"}, ["reason"]),
        ({"type": EARN, "amount": 1, "origin": Origin(id="pay\x00")}, ["origin.id"]),
        ({"type": EARN, "amount": 1, "metadata": {"k": "v\x00"}}, ["metadata[k]"]),
        ({"type": EARN, "amount": 1, "metadata": {"k\x00": "v"}}, ["metadata[k\x00]"]),
        ({"type": EARN, "amount": 1, "request_id": "r\x00"}, ["request_id"]),
    ],
)
def test_create_transaction_rejects(accounts, points, request_fields, bad_fields):
    account = funded_account(accounts, points, 10)
    invalid(
        points.CreatePointsTransaction,
        points_pb2.CreatePointsTransactionRequest(account=account.id, **request_fields),
        *bad_fields,
    )
    after = get(accounts, account.id)
    assert after.balance == 10
    listed = points.ListPointsTransactions(
        points_pb2.ListPointsTransactionsRequest(account=account.id)
    )
    assert len(listed.points_transactions) == 1


@pytest.mark.parametrize("bad_id", ["", "loy_", "loy_short", "la_4Kp9bQ", "loy_" + "a" * 21, "x"])
def test_malformed_account_ids(accounts, points, bad_id):
    invalid(accounts.GetAccount, accounts_pb2.GetAccountRequest(id=bad_id), "id")
    invalid(accounts.CloseAccount, accounts_pb2.CloseAccountRequest(id=bad_id), "id")
    invalid(accounts.ReopenAccount, accounts_pb2.ReopenAccountRequest(id=bad_id), "id")
    invalid(
        points.CreatePointsTransaction,
        points_pb2.CreatePointsTransactionRequest(account=bad_id, type=EARN, amount=1),
        "account",
    )
    invalid(
        accounts.MergeAccounts,
        accounts_pb2.MergeAccountsRequest(source=bad_id, target=bad_id),
        "source",
        "target",
    )


@pytest.mark.parametrize("bad_id", ["", "pt_7Rm1cW", "ptx_!!!!!!!!!!!!!!!!!!!!"])
def test_malformed_transaction_ids(points, bad_id):
    invalid(points.GetPointsTransaction, points_pb2.GetPointsTransactionRequest(id=bad_id), "id")
    invalid(
        points.ReversePointsTransaction,
        points_pb2.ReversePointsTransactionRequest(id=bad_id),
        "id",
    )


def test_reversal_amounts(accounts, points):
    account = create_account(accounts)
    earned = post(points, account.id, EARN, 10)
    for amount in (0, -1, 2**40):
        invalid(
            points.ReversePointsTransaction,
            points_pb2.ReversePointsTransactionRequest(id=earned.id, amount=amount),
            "amount",
        )
    invalid(
        points.ReversePointsTransaction,
        points_pb2.ReversePointsTransactionRequest(id=earned.id, reason="r" * 501),
        "reason",
    )
    assert get(accounts, account.id).balance == 10


def test_create_account_rejects(accounts):
    invalid(accounts.CreateAccount, accounts_pb2.CreateAccountRequest(), "program")
    invalid(
        accounts.CreateAccount,
        accounts_pb2.CreateAccountRequest(program="default"),
        "program",
    )
    invalid(
        accounts.CreateAccount,
        accounts_pb2.CreateAccountRequest(program="prog_default", customer="c" * 256),
        "customer",
    )
    invalid(
        accounts.CreateAccount,
        accounts_pb2.CreateAccountRequest(program="prog_default", customer="c\x00"),
        "customer",
    )
    customer = unique()
    invalid(
        accounts.CreateAccount,
        accounts_pb2.CreateAccountRequest(
            program="prog_default", customer=customer, metadata={"k": "v" * 501}
        ),
        "metadata[k]",
    )
    listed = accounts.ListAccounts(accounts_pb2.ListAccountsRequest(customer=customer))
    assert list(listed.accounts) == [], "no partial write"


def test_update_account_rejects(accounts):
    account = create_account(accounts)
    invalid(
        accounts.UpdateAccount,
        accounts_pb2.UpdateAccountRequest(
            account=accounts_pb2.Account(id=account.id, balance=10**6),
            update_mask=field_mask_pb2.FieldMask(paths=["balance"]),
        ),
        "update_mask",
    )
    invalid(
        accounts.UpdateAccount,
        accounts_pb2.UpdateAccountRequest(account=accounts_pb2.Account(id=account.id)),
        "update_mask",
    )
    assert get(accounts, account.id) == account


def test_list_rejects_bad_paging(accounts, points):
    invalid(accounts.ListAccounts, accounts_pb2.ListAccountsRequest(page_size=-1), "page_size")
    invalid(
        points.ListPointsTransactions,
        points_pb2.ListPointsTransactionsRequest(page_size=-1),
        "page_size",
    )
    invalid(
        points.ListPointsTransactions,
        points_pb2.ListPointsTransactionsRequest(type=77),
        "type",
    )
    invalid(accounts.ListAccounts, accounts_pb2.ListAccountsRequest(status=9), "status")


def test_tampered_and_mismatched_page_tokens(accounts, points):
    account = create_account(accounts)
    for _ in range(3):
        post(points, account.id, EARN, 1)
    page = points.ListPointsTransactions(
        points_pb2.ListPointsTransactionsRequest(account=account.id, page_size=1)
    )
    token = page.next_page_token
    assert token

    body, _, signature = token.partition(".")
    tampered = [
        "garbage",
        token[:-2] + ("AA" if not token.endswith("AA") else "BB"),
        body[:-2] + "xy." + signature,
        "." + signature,
    ]
    for bad in tampered:
        invalid(
            points.ListPointsTransactions,
            points_pb2.ListPointsTransactionsRequest(account=account.id, page_token=bad),
            "page_token",
        )
    # The same token with other filters, or on another list, is refused.
    invalid(
        points.ListPointsTransactions,
        points_pb2.ListPointsTransactionsRequest(account=account.id, type=EARN, page_token=token),
        "page_token",
    )
    invalid(accounts.ListAccounts, accounts_pb2.ListAccountsRequest(page_token=token), "page_token")
    # The untouched token still works, and with another page size too.
    rest = points.ListPointsTransactions(
        points_pb2.ListPointsTransactionsRequest(account=account.id, page_size=5, page_token=token)
    )
    assert len(rest.points_transactions) == 2
