"""The policy: which grant names an identity, what a token's scopes leave of it, and which
policy files are refused."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from loyalty_service.domain.callers import Caller, PolicyError, Scope, policy_from

R, W, ADJ = Scope.ACCOUNTS_READ, Scope.ACCOUNTS_WRITE, Scope.POINTS_ADJUST

POLICY = policy_from(
    {
        "callers": [
            {"identity": "spiffe://t/ns/a/*", "scopes": ["accounts.read"]},
            {"identity": "spiffe://t/ns/a/sa/*", "scopes": ["accounts.write"]},
            {"identity": "spiffe://t/ns/a/sa/admin", "scopes": ["points.adjust"]},
            {"identity": "crm", "scopes": ["accounts.read", "accounts.write"], "programs": ["p1"]},
            {"identity": "nobody", "scopes": []},
        ]
    }
)


@pytest.mark.parametrize(
    ("identity", "token_scopes", "scopes", "programs"),
    [
        # The exact grant wins over every wildcard.
        ("spiffe://t/ns/a/sa/admin", None, {ADJ}, None),
        # Of wildcards, the longest prefix; grants never add up.
        ("spiffe://t/ns/a/sa/checkout", None, {W}, None),
        ("spiffe://t/ns/a/other", None, {R}, None),
        # A wildcard's prefix is matched as text, exactly.
        ("spiffe://t/ns/ab", None, set(), frozenset()),
        ("crm", None, {R, W}, frozenset({"p1"})),
        # A token narrows its grant, and cannot widen it.
        ("crm", frozenset({"accounts.read", "points.adjust"}), {R}, frozenset({"p1"})),
        ("crm", frozenset(), set(), frozenset({"p1"})),
        ("nobody", frozenset({"accounts.read"}), set(), None),
        # Named by no grant: nothing, on no program.
        ("stranger", frozenset(s.value for s in Scope), set(), frozenset()),
    ],
)
def test_the_grant_of_an_identity(identity, token_scopes, scopes, programs):
    caller = POLICY.caller(identity, token_scopes)
    assert caller == Caller(identity, frozenset(scopes), programs)


def test_a_caller_sees_its_programs_only():
    assert Caller("x", frozenset(), frozenset({"p1"})).sees("p1")
    assert not Caller("x", frozenset(), frozenset({"p1"})).sees("p2")
    assert Caller("x", frozenset(), None).sees("p2")


@pytest.mark.parametrize(
    ("document", "says"),
    [
        ({"grants": []}, "[[callers]] tables only"),
        ({"callers": [{"identity": "a", "scopes": ["points.mint"]}]}, "scopes are"),
        ({"callers": [{"identity": "a*b", "scopes": []}]}, "`*` only at its end"),
        ({"callers": [{"identity": "", "scopes": []}]}, "identity must be text"),
        ({"callers": [{"identity": "a", "scopes": "accounts.read"}]}, "list of strings"),
        ({"callers": [{"identity": "a", "scopes": [], "program": ["p"]}]}, "takes identity"),
        ({"callers": [{"identity": "a", "scopes": []}] * 2}, "granted twice"),
        ({"callers": [{"identity": "a", "scopes": [], "programs": "p"}]}, "list of strings"),
    ],
)
def test_a_policy_it_cannot_follow_is_refused(document, says):
    with pytest.raises(PolicyError, match=None) as raised:
        policy_from(document)
    assert says in str(raised.value)


def test_the_example_policy_is_one():
    path = Path(__file__).parents[2] / "docs" / "policy.example.toml"
    policy = policy_from(tomllib.loads(path.read_text()))
    checkout = policy.caller("spiffe://payments.internal/ns/checkout/sa/checkout", None)
    assert Scope.PAYMENTS_WRITE in checkout.scopes and Scope.POINTS_ADJUST not in checkout.scopes
    assert policy.caller("crm-service", None).programs == frozenset({"prog_coffee", "prog_books"})
    support = policy.caller("spiffe://payments.internal/ns/support/sa/alice", None)
    assert Scope.POINTS_ADJUST in support.scopes and Scope.PAYMENTS_WRITE not in support.scopes
