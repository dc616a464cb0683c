"""Who may call what, through the real server on a real port: every RPC of the protos (from
their descriptors) against every kind of credential, with the exact code and reason, no
bypass, and nothing written by a refused call; program-limited callers; the actor of every
change; the safe defaults."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from loyalty_service.api.scopes import SCOPES
from loyalty_service.config import Settings
from loyalty_service.db import libpq_url
from loyalty_service.domain.callers import Scope
from loyalty_service.pb import (
    accounts_pb2,
    events_pb2,
    points_pb2,
    programs_pb2,
)
from loyalty_service.server import Unprotected, check_exposure
from tests.conftest import ServiceProcess, cli, free_port
from tests.credentials import CertificateAuthority, TokenIssuer
from tests.events_support import all_events, event_of
from tests.support import (
    ADJUST,
    CREDIT,
    EARN,
    NOT_FOUND,
    Stubs,
    account_request,
    failed_with,
    failure,
    post,
    unique,
)

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
ISSUER, AUDIENCE = "https://idp.test", "loyalty"
EVERY_SCOPE = " ".join(s.value for s in Scope)


@dataclass(frozen=True)
class Method:
    path: str  # /package.Service/Method
    request: type
    response: type
    streams: bool


def _methods() -> list[Method]:
    found = []
    for module in (accounts_pb2, points_pb2, programs_pb2, events_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                found.append(
                    Method(
                        f"/{service.full_name}/{m.name}",
                        message_factory.GetMessageClass(m.input_type),
                        message_factory.GetMessageClass(m.output_type),
                        m.server_streaming,
                    )
                )
    return found


METHODS = _methods()


def test_every_rpc_of_the_protos_has_exactly_one_scope():
    assert sorted(m.path for m in METHODS) == sorted(SCOPES)
    assert len(METHODS) == 27


def call(channel: grpc.Channel, method: Method, token: str | None = None, **headers: str):
    """Calls `method` with an empty request: None if admitted (whatever the ledger then says,
    short of a refusal), else the RpcError."""
    metadata = [(k.replace("_", "-"), v) for k, v in headers.items()]
    if token is not None:
        metadata.append(("authorization", f"Bearer {token}"))
    options = {
        "request_serializer": method.request.SerializeToString,
        "response_deserializer": method.response.FromString,
    }
    try:
        if method.streams:
            stream = channel.unary_stream(method.path, **options)(
                method.request(), metadata=metadata, timeout=10
            )
            try:
                next(stream)  # a subscription's first response comes at once
            finally:
                stream.cancel()
        else:
            channel.unary_unary(method.path, **options)(
                method.request(), metadata=metadata, timeout=10
            )
    except grpc.RpcError as error:
        if error.code() in (UNAUTHENTICATED, PERMISSION_DENIED, grpc.StatusCode.UNAVAILABLE):
            return error
    return None


class Pki:
    """A client CA the servers trust, one they do not, a server certificate, an identity
    provider, and a policy file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = CertificateAuthority("loyalty test CA")
        self.rogue = CertificateAuthority("rogue CA")
        self.issuer = TokenIssuer(ISSUER, AUDIENCE)
        key, cert = self.ca.issue(server=True)
        self.files = {
            "key": self._write("server.key", key),
            "cert": self._write("server.crt", cert),
            "ca": self._write("ca.crt", self.ca.pem),
        }
        self.jwks = self.issuer.write_jwks(directory / "jwks.json")

    def _write(self, name: str, data: bytes) -> str:
        path = self.directory / name
        path.write_bytes(data)
        return str(path)

    def policy(self, text: str) -> str:
        return self._write(f"policy-{unique()}.toml", text.encode())

    def channel(
        self, address: str, client: tuple[bytes, bytes] | None = None, token: str | None = None
    ) -> grpc.Channel:
        """A TLS channel; with a client certificate, and with a bearer token on every call."""
        credentials = self.credentials(client)
        if token is not None:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(token)
            )
        return grpc.secure_channel(address, credentials)

    def credentials(self, client: tuple[bytes, bytes] | None = None) -> grpc.ChannelCredentials:
        key, cert = client if client else (None, None)
        return grpc.ssl_channel_credentials(self.ca.pem, key, cert)


POLICY = """
[[callers]]
identity = "checkout"
scopes = [{every}]

[[callers]]
identity = "spiffe://test/ns/payments/sa/*"
scopes = [{every}]

[[callers]]
identity = "spiffe://test/ns/payments/sa/nothing"
scopes = []

[[callers]]
identity = "crm-a"
scopes = [{every}]
programs = ["prog_default"]
""".format(every=", ".join(f'"{s.value}"' for s in Scope))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def servers(pki: Pki, postgres_server_url: str):
    """On one database: `tokens`, TLS with bearer tokens (the forwarded-certificate header
    not trusted); `mtls`, client certificates required. Both with POLICY."""
    from tests.conftest import Databases

    databases = Databases(postgres_server_url)
    url = databases.create()
    policy = pki.policy(POLICY)
    tls = {
        "LOYALTY_TLS_CERT_FILE": pki.files["cert"],
        "LOYALTY_TLS_KEY_FILE": pki.files["key"],
        "LOYALTY_POLICY_FILE": policy,
    }
    tokens = ServiceProcess(
        url,
        credentials=pki.credentials(),
        LOYALTY_JWT_JWKS=str(pki.jwks),
        LOYALTY_JWT_ISSUER=ISSUER,
        LOYALTY_JWT_AUDIENCE=AUDIENCE,
        **tls,
    )
    client = pki.ca.issue(uri="spiffe://test/ns/payments/sa/checkout")
    mtls = ServiceProcess(
        url,
        credentials=pki.credentials(client),
        LOYALTY_TLS_CLIENT_CA_FILE=pki.files["ca"],
        **tls,
    )
    yield url, tokens, mtls
    for server in (tokens, mtls):
        code, output = server.stop()
        assert code == 0, output
        assert "Traceback" not in output, output


def _written(url: str) -> dict[str, int]:
    """How many rows each table that a change writes holds."""
    tables = (
        "accounts", "points_transactions", "programs", "earning_rule_versions", "payments",
        "refunds", "account_merges", "idempotency_keys", "events", "event_queue", "points_holds",
    )  # fmt: skip
    with psycopg.connect(libpq_url(url)) as conn:
        counts = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}
    # An event moves from the queue to the log meanwhile: both count.
    counts["events"] += counts.pop("event_queue")
    return counts


def _others(scope: Scope) -> str:
    return " ".join(s.value for s in Scope if s is not scope)


def test_every_rpc_against_every_credential(servers, pki):
    """Each RPC x each credential: the code and reason expected, no refusal missed or made
    wrongly, and not a row written by the refused calls."""
    url, tokens, mtls = servers
    issuer = pki.issuer
    stranger = TokenIssuer(ISSUER, AUDIENCE)  # same kid, another key: a bad signature
    untrusted = pki.rogue.issue(uri="spiffe://test/ns/payments/sa/checkout")
    trusted_without = pki.ca.issue(uri="spiffe://test/ns/payments/sa/nothing")
    trusted_with = pki.ca.issue(uri="spiffe://test/ns/payments/sa/checkout")
    forged = "By=spiffe://test/loyalty;URI=spiffe://test/ns/payments/sa/checkout"
    before = _written(url)
    refused, admitted, bypasses = 0, 0, []
    with (
        pki.channel(tokens.address) as plain,
        pki.channel(mtls.address, untrusted) as rogue,
        pki.channel(mtls.address, trusted_without) as without,
        pki.channel(mtls.address, trusted_with) as with_scope,
    ):
        for method in METHODS:
            scope = SCOPES[method.path]
            refusals = [
                (call(plain, method), UNAUTHENTICATED, "CREDENTIALS_MISSING"),
                (
                    call(plain, method, issuer.token(expires_in=-120)),
                    UNAUTHENTICATED,
                    "TOKEN_EXPIRED",
                ),
                (
                    call(plain, method, issuer.token(audience="another")),
                    UNAUTHENTICATED,
                    "TOKEN_WRONG_AUDIENCE",
                ),
                (
                    call(plain, method, issuer.token(sign_with=stranger)),
                    UNAUTHENTICATED,
                    "TOKEN_BAD_SIGNATURE",
                ),
                (
                    call(plain, method, issuer.token(scopes=_others(scope))),
                    PERMISSION_DENIED,
                    "MISSING_SCOPE",
                ),
                (call(without, method), PERMISSION_DENIED, "MISSING_SCOPE"),
                # Not trusted: the header is not looked at, so the call has no credentials.
                (
                    call(plain, method, x_forwarded_client_cert=forged),
                    UNAUTHENTICATED,
                    "CREDENTIALS_MISSING",
                ),
            ]
            for error, code, reason in refusals:
                if error is None:
                    bypasses.append((method.path, reason))
                    continue
                found = failed_with(error, code, reason)
                if reason == "MISSING_SCOPE":
                    assert found.metadata == {"scope": scope.value, "method": method.path}
                refused += 1
            # A certificate from another CA: refused in the TLS handshake, before any call.
            error = call(rogue, method)
            assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
            for error in (
                call(plain, method, issuer.token(scopes=scope.value)),
                call(
                    plain,
                    method,
                    issuer.token(scopes=EVERY_SCOPE, subject=None, client_id="checkout"),
                ),
                call(with_scope, method),
            ):
                assert error is None, (method.path, failure(error))
                admitted += 1
    assert bypasses == []
    assert (refused, admitted) == (7 * len(METHODS), 3 * len(METHODS))
    assert _written(url) == before


def test_refused_writes_write_nothing_and_are_logged(servers, pki):
    """Requests that would write, refused: not a row, and a log line each with its caller
    and method."""
    url, tokens, _ = servers
    reader = pki.issuer.token("reader", scopes="accounts.read points.read")
    with (
        pki.channel(tokens.address, token=pki.issuer.token(scopes=EVERY_SCOPE)) as admin,
        pki.channel(tokens.address, token=reader) as channel,
    ):
        account = Stubs(admin).accounts.CreateAccount(account_request())
        stubs = Stubs(channel)
        before = _written(url)
        writes = [
            (stubs.accounts.CreateAccount, account_request()),
            (
                stubs.points.CreatePointsTransaction,
                points_pb2.CreatePointsTransactionRequest(
                    account=account.id, type=ADJUST, direction=CREDIT, amount=1_000_000
                ),
            ),
            (
                stubs.accounts.MergeAccounts,
                accounts_pb2.MergeAccountsRequest(source=account.id, target=account.id),
            ),
            (
                stubs.points.RecordPayment,
                points_pb2.RecordPaymentRequest(
                    payment_id=unique("pay"), program="prog_default", customer="c", amount=100,
                    currency="EUR",
                ),
            ),
        ]  # fmt: skip
        for rpc, request in writes:
            with pytest.raises(grpc.RpcError) as caught:
                rpc(request)
            failed_with(caught.value, PERMISSION_DENIED, "MISSING_SCOPE")
    assert _written(url) == before
    deadline = time.monotonic() + 5
    while "refused /vinr.loyalty.v1.PointsLedger/RecordPayment for reader" not in tokens.output():
        assert time.monotonic() < deadline, tokens.output()
        time.sleep(0.1)
    assert "refused /vinr.loyalty.v1.LoyaltyAccounts/CreateAccount for reader" in tokens.output()


def test_adjusting_points_by_hand_needs_points_adjust(servers, pki):
    _, tokens, _ = servers
    writer = pki.issuer.token(scopes="accounts.write points.write")
    adjuster = pki.issuer.token(scopes="points.write points.adjust")
    with (
        pki.channel(tokens.address, token=writer) as as_writer,
        pki.channel(tokens.address, token=adjuster) as as_adjuster,
    ):
        writes = Stubs(as_writer)
        account = writes.accounts.CreateAccount(account_request())
        assert post(writes.points, account.id, EARN, 5).points_after == 5
        with pytest.raises(grpc.RpcError) as caught:
            post(writes.points, account.id, ADJUST, 5, CREDIT)
        found = failed_with(caught.value, PERMISSION_DENIED, "MISSING_SCOPE")
        assert found.metadata == {
            "scope": "points.adjust",
            "method": "/vinr.loyalty.v1.PointsLedger/CreatePointsTransaction",
        }
        assert post(Stubs(as_adjuster).points, account.id, ADJUST, 5, CREDIT).points_after == 10


def test_health_is_open_and_every_change_carries_its_actor(servers, pki):
    """Health answers without credentials. A change records its caller's identity: a
    token's client id, a certificate's URI SAN; on the ledger row, the account, and their
    events' snapshots. One caller's request id is not another's."""
    _, tokens, mtls = servers
    token = pki.issuer.token("someone", client_id="checkout", scopes=EVERY_SCOPE)
    client = pki.ca.issue(uri="spiffe://test/ns/payments/sa/checkout")
    spiffe = "spiffe://test/ns/payments/sa/checkout"
    with (
        pki.channel(tokens.address) as anonymous,
        pki.channel(tokens.address, token=token) as channel,
        pki.channel(mtls.address, client) as mutual,
    ):
        health = health_pb2_grpc.HealthStub(anonymous)
        assert health.Check(health_pb2.HealthCheckRequest()).status == 1  # SERVING
        one, two = Stubs(channel), Stubs(mutual)
        account = one.accounts.CreateAccount(account_request())
        assert account.actor == "checkout"
        first = post(one.points, account.id, EARN, 7, request_id="r-1")
        again = post(one.points, account.id, EARN, 7, request_id="r-1")
        second = post(two.points, account.id, EARN, 7, request_id="r-1")  # another caller
        assert first.id == again.id != second.id
        assert (first.actor, second.actor) == ("checkout", spiffe)
        after = two.accounts.GetAccount(accounts_pb2.GetAccountRequest(id=account.id))
        assert (after.balance, after.actor) == (14, spiffe)
        got = one.points.GetPointsTransaction(points_pb2.GetPointsTransactionRequest(id=first.id))
        assert got.actor == "checkout"
        events = [event_of(e) for e in all_events(mutual, account=account.id)]
        assert [(e.type, e.snapshot.actor) for e in events] == [
            ("loyalty.account.created", "checkout"),
            ("points_transaction.created", "checkout"),
            ("points_transaction.created", spiffe),
        ]


def test_a_caller_limited_to_a_program_sees_no_other(servers, pki):
    """crm-a may touch prog_default only: another program's accounts, transactions and
    events do not exist for it; its lists and subscriptions name its program."""
    _, tokens, _ = servers
    with (
        pki.channel(tokens.address, token=pki.issuer.token(scopes=EVERY_SCOPE)) as admin,
        pki.channel(tokens.address, token=pki.issuer.token("crm-a", scopes=EVERY_SCOPE)) as crm,
    ):
        full, stubs = Stubs(admin), Stubs(crm)
        other = full.programs.CreateProgram(_program_request())
        theirs = full.accounts.CreateAccount(account_request(program=other.id))
        earned = post(full.points, theirs.id, EARN, 3)
        their_hold = full.points.CreateHold(
            points_pb2.CreateHoldRequest(account=theirs.id, amount=1, reference=unique("auth"))
        )
        mine = stubs.accounts.CreateAccount(account_request())
        before = _written(servers[0])
        refusals = [
            (
                stubs.accounts.GetAccount,
                accounts_pb2.GetAccountRequest(id=theirs.id),
                "ACCOUNT_NOT_FOUND",
            ),
            (
                stubs.points.CreatePointsTransaction,
                points_pb2.CreatePointsTransactionRequest(account=theirs.id, type=EARN, amount=1),
                "ACCOUNT_NOT_FOUND",
            ),
            (
                stubs.points.GetPointsTransaction,
                points_pb2.GetPointsTransactionRequest(id=earned.id),
                "POINTS_TRANSACTION_NOT_FOUND",
            ),
            (
                stubs.points.ReversePointsTransaction,
                points_pb2.ReversePointsTransactionRequest(id=earned.id),
                "POINTS_TRANSACTION_NOT_FOUND",
            ),
            (
                stubs.accounts.MergeAccounts,
                accounts_pb2.MergeAccountsRequest(source=theirs.id, target=mine.id),
                "ACCOUNT_NOT_FOUND",
            ),
            (
                stubs.accounts.CloseAccount,
                accounts_pb2.CloseAccountRequest(id=theirs.id),
                "ACCOUNT_NOT_FOUND",
            ),
            (
                stubs.points.CreateHold,
                points_pb2.CreateHoldRequest(account=theirs.id, amount=1, reference="a"),
                "ACCOUNT_NOT_FOUND",
            ),
            (
                stubs.points.GetHold,
                points_pb2.GetHoldRequest(id=their_hold.id),
                "HOLD_NOT_FOUND",
            ),
            (
                stubs.points.CaptureHold,
                points_pb2.CaptureHoldRequest(id=their_hold.id),
                "HOLD_NOT_FOUND",
            ),
            (
                stubs.points.ReleaseHold,
                points_pb2.ReleaseHoldRequest(id=their_hold.id),
                "HOLD_NOT_FOUND",
            ),
            (
                stubs.points.ListHolds,
                points_pb2.ListHoldsRequest(account=theirs.id),
                "ACCOUNT_NOT_FOUND",
            ),
            (
                stubs.programs.GetProgram,
                programs_pb2.GetProgramRequest(id=other.id),
                "PROGRAM_NOT_FOUND",
            ),
            (stubs.accounts.CreateAccount, account_request(program=other.id), "PROGRAM_NOT_FOUND"),
            (
                stubs.events.ListEvents,
                events_pb2.ListEventsRequest(program=other.id),
                "PROGRAM_NOT_FOUND",
            ),
        ]  # fmt: skip
        for rpc, request, reason in refusals:
            with pytest.raises(grpc.RpcError) as caught:
                rpc(request)
            failed_with(caught.value, NOT_FOUND, reason)
        assert _written(servers[0]) == before
        stream = stubs.points.SubscribeTransactionEvents(
            points_pb2.SubscribeTransactionEventsRequest(account=theirs.id)
        )
        with pytest.raises(grpc.RpcError) as caught:
            next(stream)
        failed_with(caught.value, NOT_FOUND, "ACCOUNT_NOT_FOUND")
        with pytest.raises(grpc.RpcError) as caught:
            stubs.events.ListEvents(events_pb2.ListEventsRequest())
        assert failure(caught.value).field_violations == {
            "program": "is required of a caller limited to some programs"
        }
        listed = stubs.accounts.ListAccounts(accounts_pb2.ListAccountsRequest(page_size=1000))
        assert mine.id in {a.id for a in listed.accounts}
        assert {a.program for a in listed.accounts} == {"prog_default"}
        asked = accounts_pb2.ListAccountsRequest(program=other.id)
        assert list(stubs.accounts.ListAccounts(asked).accounts) == []
        programs = stubs.programs.ListPrograms(programs_pb2.ListProgramsRequest())
        assert [p.id for p in programs.programs] == ["prog_default"]
        with pytest.raises(grpc.RpcError) as caught:
            stubs.programs.CreateProgram(_program_request())
        failed_with(caught.value, PERMISSION_DENIED, "PROGRAMS_RESTRICTED")
        # Its own program's events, of its own account.
        events = all_events(crm, program="prog_default", account=mine.id)
        assert [event_of(e).snapshot.id for e in events] == [mine.id]


def _program_request() -> programs_pb2.CreateProgramRequest:
    return programs_pb2.CreateProgramRequest(
        program=programs_pb2.Program(name="Other club", currency="EUR")
    )


def test_an_open_port_beyond_loopback_needs_an_identity_source(database_url):
    """With no identity source the server listens on loopback only, unless the network is
    declared trusted (and then says so at every start). Reflection can be switched off."""
    port = free_port()
    env = {
        **os.environ,
        "LOYALTY_DATABASE_URL": database_url,
        "LOYALTY_LISTEN_ADDRESS": f"0.0.0.0:{port}",
        "LOYALTY_LOG_LEVEL": "WARNING",
    }
    refused = cli("serve", env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = refused.communicate(timeout=60)[0]
    assert refused.returncode == 2, output
    assert f"refusing to listen on 0.0.0.0:{port} with no identity source" in output
    assert "Traceback" not in output

    trusted = ServiceProcess(
        database_url,
        port=port,
        LOYALTY_LISTEN_ADDRESS=f"0.0.0.0:{port}",
        LOYALTY_TRUSTED_NETWORK="true",
        LOYALTY_REFLECTION="false",
    )
    try:
        with grpc.insecure_channel(trusted.address) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            with pytest.raises(grpc.RpcError) as caught:
                next(stub.ServerReflectionInfo(iter([request])))
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
            # Everyone is `anonymous`, with every scope.
            account = Stubs(channel).accounts.CreateAccount(account_request())
            assert account.actor == "anonymous"
    finally:
        code, output = trusted.stop()
    assert code == 0, output
    assert "every caller on 0.0.0.0:" in output and "LOYALTY_TRUSTED_NETWORK=true" in output


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"tls_cert_file": "c.pem"}, "go together"),
        ({"tls_client_ca_file": "ca.pem"}, "needs LOYALTY_TLS_CERT_FILE"),
        ({"jwt_jwks": "jwks.json", "policy_file": "p.toml"}, "needs LOYALTY_JWT_ISSUER"),
        ({"policy_file": "p.toml"}, "goes with an identity source"),
        ({"trust_forwarded_client_cert": True}, "goes with an identity source"),
        (
            {"trust_forwarded_client_cert": True, "policy_file": "p", "jwt_leeway": 301},
            "0 to 300",
        ),
    ],
)
def test_settings_that_do_not_fit_together_are_refused(settings, says):
    with pytest.raises(ValueError) as raised:
        Settings(**settings)
    assert says in str(raised.value)


@pytest.mark.parametrize(
    ("address", "open_"),
    [
        ("localhost:50051", False),
        ("127.0.0.1:0", False),
        ("[::1]:50051", False),
        ("0.0.0.0:50051", True),
        ("[::]:50051", True),
        ("10.1.2.3:50051", True),
        ("loyalty.internal:50051", True),  # a name may resolve to anything
    ],
)
def test_only_loopback_is_served_without_an_identity_source(address, open_):
    if open_:
        with pytest.raises(Unprotected):
            check_exposure(Settings(listen_address=address))
    else:
        check_exposure(Settings(listen_address=address))
    check_exposure(Settings(listen_address=address, trusted_network=True))
    check_exposure(
        Settings(listen_address=address, trust_forwarded_client_cert=True, policy_file="p")
    )
