"""Authentication: who a call's token, forwarded certificate or mTLS peer says is calling,
and the exact reason when they do not."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from pathlib import Path

import grpc
import jwt
import pytest

from loyalty_service.api.identity import Authenticated, Authenticator, TokenSettings
from loyalty_service.domain.errors import (
    CertificateWithoutIdentity,
    CredentialsMissing,
    ForwardedCertificateMalformed,
    TokenBadSignature,
    TokenExpired,
    TokenMalformed,
    TokenNotYetValid,
    TokenUnknownKey,
    TokenWrongAudience,
    TokenWrongIssuer,
    Unauthenticated,
)
from tests.credentials import CertificateAuthority, JwksServer, TokenIssuer

ISSUER = "https://idp.vinr.test"
AUDIENCE = "loyalty-ledger"
CHECKOUT = "spiffe://payments.internal/ns/checkout/sa/checkout"
XFCC = "x-forwarded-client-cert"

Metadata = Sequence[tuple[str, str | bytes]]


@pytest.fixture(scope="module")
def issuer() -> TokenIssuer:
    return TokenIssuer(ISSUER, AUDIENCE)


@pytest.fixture(scope="module")
def stranger() -> TokenIssuer:
    """Another identity provider, whose keys the service does not trust."""
    return TokenIssuer(ISSUER, AUDIENCE)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority("clients")


def tokens(jwks: str | Path, **settings) -> TokenSettings:
    return TokenSettings(str(jwks), ISSUER, AUDIENCE, **settings)


@pytest.fixture
def with_tokens(issuer: TokenIssuer, tmp_path: Path) -> Authenticator:
    jwks = issuer.write_jwks(tmp_path / "jwks.json")
    return Authenticator(tokens(jwks), forwarded_client_cert=True, client_certificates=True)


def authenticate(
    authenticator: Authenticator,
    metadata: Metadata | None = (),
    auth_context: dict[str, list[bytes]] | None = None,
) -> Authenticated:
    return asyncio.run(authenticator.authenticate(metadata, auth_context or {}))


def refused(
    authenticator: Authenticator,
    metadata: Metadata | None = (),
    auth_context: dict[str, list[bytes]] | None = None,
) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as raised:
        authenticate(authenticator, metadata, auth_context)
    return raised.value


def undecodable_signature(token: str) -> str:
    """The token with its signature cut to a length no base64 text has (4n + 1)."""
    head, signature = token.rsplit(".", 1)
    return f"{head}.{signature[: len(signature) // 4 * 4 - 3]}"


def shorter_signature(token: str) -> str:
    """The token with the last 3 bytes of its signature cut (still base64url)."""
    head, signature = token.rsplit(".", 1)
    return f"{head}.{signature[: len(signature) // 4 * 4 - 4]}"


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


def peer(cert_pem: bytes) -> dict[str, list[bytes]]:
    """An auth context as grpc gives it for an mTLS peer (the keys this module reads)."""
    return {"transport_security_type": [b"ssl"], "x509_pem_cert": [cert_pem]}


# --- tokens ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "identity", "scopes"),
    [
        (lambda i: i.token("checkout"), "checkout", frozenset()),
        (lambda i: i.token("user-7", client_id="checkout-svc"), "checkout-svc", frozenset()),
        (lambda i: i.token(None, client_id="checkout-svc"), "checkout-svc", frozenset()),
        (
            lambda i: i.token(scopes="points.read  points.write"),
            "checkout",
            frozenset({"points.read", "points.write"}),
        ),
        (
            lambda i: i.token(scp=["points.read", "events.read"]),
            "checkout",
            {"points.read", "events.read"},
        ),
        (
            lambda i: i.token(scp="accounts.read accounts.write"),
            "checkout",
            {"accounts.read", "accounts.write"},
        ),
        (
            lambda i: i.token(scopes="points.read", scp=["points.adjust"]),
            "checkout",
            {"points.read"},
        ),
        (lambda i: i.token(audience=["other", AUDIENCE]), "checkout", frozenset()),
        (lambda i: i.token(omit=("kid", "iat")), "checkout", frozenset()),
        (lambda i: i.token(not_before=0), "checkout", frozenset()),
        (lambda i: i.token("x" * 512), "x" * 512, frozenset()),
    ],
    ids=[
        "sub",
        "client_id-over-sub",
        "client_id-only",
        "scope",
        "scp-list",
        "scp-string",
        "scope-over-scp",
        "audience-list",
        "no-kid-one-key",
        "nbf-now",
        "identity-512",
    ],
)
def test_a_valid_token_names_its_caller(with_tokens, issuer, token, identity, scopes):
    caller = authenticate(with_tokens, bearer(token(issuer)))
    assert caller == Authenticated(identity, "token", frozenset(scopes))


def test_the_bearer_scheme_is_case_insensitive(with_tokens, issuer):
    caller = authenticate(with_tokens, (("authorization", f"bearer {issuer.token()}"),))
    assert caller == Authenticated("checkout", "token", frozenset())


@pytest.mark.parametrize(
    ("token", "error"),
    [
        (lambda i, s: i.token(expires_in=-120), TokenExpired),
        (lambda i, s: i.token(not_before=120), TokenNotYetValid),
        (lambda i, s: i.token(issued_at=120), TokenNotYetValid),
        (lambda i, s: i.token(sign_with=s), TokenBadSignature),
        (lambda i, s: i.token(kid="k9"), TokenUnknownKey),
        (lambda i, s: s.token(), TokenBadSignature),  # same kid, another key
        (lambda i, s: i.token(issuer="https://other.test"), TokenWrongIssuer),
        (lambda i, s: i.token(audience="another-service"), TokenWrongAudience),
        (lambda i, s: i.token(omit=("exp",)), TokenMalformed),
        (lambda i, s: i.token(expires_in=None), TokenMalformed),
        (lambda i, s: i.token(omit=("iss",)), TokenMalformed),
        (lambda i, s: i.token(omit=("aud",)), TokenMalformed),
        (lambda i, s: i.token(exp="tomorrow"), TokenMalformed),
        (lambda i, s: i.token(None), TokenMalformed),
        (lambda i, s: i.token(None, client_id=""), TokenMalformed),
        (lambda i, s: i.token(sub=7), TokenMalformed),
        (lambda i, s: i.token(client_id=["a"]), TokenMalformed),
        (lambda i, s: i.token("x" * 513), TokenMalformed),
        (lambda i, s: i.token("check\nout"), TokenMalformed),
        (lambda i, s: i.token(scope=5), TokenMalformed),
        (lambda i, s: i.token(scp=["a", 1]), TokenMalformed),
        (lambda i, s: "not-a-jwt", TokenMalformed),
        (lambda i, s: undecodable_signature(i.token()), TokenMalformed),
        (lambda i, s: shorter_signature(i.token()), TokenBadSignature),
        (
            lambda i, s: jwt.encode(
                {"sub": "x", "iss": ISSUER, "aud": AUDIENCE, "exp": 2**40},
                "",
                algorithm="none",
                headers={"kid": "k1"},
            ),
            TokenMalformed,
        ),
        (
            lambda i, s: jwt.encode(
                {"sub": "x", "iss": ISSUER, "aud": AUDIENCE, "exp": 2**40},
                "a shared secret of at least 32 bytes",
                algorithm="HS256",
                headers={"kid": "k1"},
            ),
            TokenMalformed,
        ),
    ],
    ids=[
        "expired",
        "nbf-future",
        "iat-future",
        "signed-by-another-key",
        "unknown-kid",
        "another-issuers-token",
        "wrong-issuer",
        "wrong-audience",
        "no-exp",
        "no-exp-none",
        "no-iss",
        "no-aud",
        "exp-not-a-number",
        "no-identity",
        "empty-client_id",
        "sub-not-a-string",
        "client_id-not-a-string",
        "identity-513",
        "identity-control-character",
        "scope-not-a-string",
        "scp-not-strings",
        "not-a-jwt",
        "undecodable-signature",
        "shorter-signature",
        "alg-none",
        "alg-hs256",
    ],
)
def test_a_bad_token_is_refused_with_its_reason(with_tokens, issuer, stranger, token, error):
    refusal = refused(with_tokens, bearer(token(issuer, stranger)), peer(b"ignored"))
    assert type(refusal) is error
    assert refusal.reason == error.reason


def test_errors_name_the_missing_claim_and_the_expected_values(with_tokens, issuer):
    missing = refused(with_tokens, bearer(issuer.token(omit=("aud",))))
    assert (missing.reason, missing.metadata) == ("TOKEN_MALFORMED", {"claim": "aud"})
    wrong = refused(with_tokens, bearer(issuer.token(audience="another-service")))
    assert (wrong.reason, wrong.metadata) == ("TOKEN_WRONG_AUDIENCE", {"expected": AUDIENCE})
    wrong = refused(with_tokens, bearer(issuer.token(issuer="https://other.test")))
    assert (wrong.reason, wrong.metadata) == ("TOKEN_WRONG_ISSUER", {"expected": ISSUER})


def test_only_the_configured_algorithms_verify(issuer, tmp_path):
    jwks = issuer.write_jwks(tmp_path / "jwks.json")
    rs256_only = Authenticator(
        tokens(jwks, algorithms=("RS256",)), forwarded_client_cert=False, client_certificates=False
    )
    assert type(refused(rs256_only, bearer(issuer.token()))) is TokenMalformed


@pytest.mark.parametrize("algorithms", [(), ("HS256",), ("ES256", "none"), ("RS256", "HS512")])
def test_symmetric_or_no_algorithms_are_a_configuration_error(issuer, tmp_path, algorithms):
    jwks = issuer.write_jwks(tmp_path / "jwks.json")
    with pytest.raises(ValueError, match="token algorithms"):
        Authenticator(
            tokens(jwks, algorithms=algorithms),
            forwarded_client_cert=False,
            client_certificates=False,
        )


def test_a_token_without_kid_is_refused_when_the_set_has_several_keys(tmp_path):
    rotating = TokenIssuer(ISSUER, AUDIENCE)
    rotating.rotate("k2")
    authenticator = Authenticator(
        tokens(rotating.write_jwks(tmp_path / "jwks.json")),
        forwarded_client_cert=False,
        client_certificates=False,
    )
    assert authenticate(authenticator, bearer(rotating.token(kid="k1"))).identity == "checkout"
    assert type(refused(authenticator, bearer(rotating.token(omit=("kid",))))) is TokenUnknownKey


@pytest.mark.parametrize(
    ("claims", "leeway", "error"),
    [
        ({"expires_in": -10}, 30.0, None),
        ({"expires_in": -60}, 30.0, TokenExpired),
        ({"expires_in": -10}, 0.0, TokenExpired),
        ({"not_before": 10}, 30.0, None),
        ({"not_before": 60}, 30.0, TokenNotYetValid),
        ({"issued_at": 10}, 30.0, None),
        ({"issued_at": 60}, 30.0, TokenNotYetValid),
    ],
)
def test_leeway_allows_that_much_clock_skew(issuer, tmp_path, claims, leeway, error):
    jwks = issuer.write_jwks(tmp_path / "jwks.json")
    authenticator = Authenticator(
        tokens(jwks, leeway=leeway), forwarded_client_cert=False, client_certificates=False
    )
    metadata = bearer(issuer.token(**claims))
    if error is None:
        assert authenticate(authenticator, metadata).identity == "checkout"
    else:
        assert type(refused(authenticator, metadata)) is error


@pytest.mark.parametrize(
    "authorization",
    [
        ["Basic Y2hlY2tvdXQ6c2VjcmV0"],
        ["Bearer"],
        ["Bearer "],
        ["Bearer two parts"],
        ["Token abc"],
        ["Bearer a.b.c", "Bearer d.e.f"],
    ],
)
def test_an_authorization_header_that_is_not_one_bearer_token_is_refused(
    with_tokens, ca, authorization
):
    metadata = [("authorization", value) for value in authorization]
    metadata.append((XFCC, f"URI={CHECKOUT}"))
    _, cert = ca.issue(cn="checkout")
    refusal = refused(with_tokens, metadata, peer(cert))
    assert (type(refusal), refusal.reason) == (TokenMalformed, "TOKEN_MALFORMED")


def test_a_rotated_key_is_fetched_once_from_the_jwks_url():
    rotating = TokenIssuer(ISSUER, AUDIENCE)
    with JwksServer(rotating) as server:
        authenticator = Authenticator(
            tokens(server.url, refresh_cooldown=0),
            forwarded_client_cert=False,
            client_certificates=False,
        )
        assert authenticate(authenticator, bearer(rotating.token())).identity == "checkout"
        assert authenticate(authenticator, bearer(rotating.token())).identity == "checkout"
        assert server.fetches == 1  # the set is cached
        rotating.rotate("k2")
        assert authenticate(authenticator, bearer(rotating.token("svc-2"))).identity == "svc-2"
        assert server.fetches == 2  # one refetch for the unknown kid
        assert authenticate(authenticator, bearer(rotating.token(kid="k1"))).identity == "checkout"
        assert server.fetches == 2
        refusal = refused(authenticator, bearer(rotating.token(kid="k9")))
        assert (type(refusal), refusal.message) == (
            TokenUnknownKey,
            "no key of the key set matches the token's key id",
        )
        assert server.fetches == 3  # refetched once, still unknown


def test_unknown_kids_refetch_the_jwks_at_most_once_per_cooldown():
    rotating = TokenIssuer(ISSUER, AUDIENCE)
    with JwksServer(rotating) as server:
        authenticator = Authenticator(
            tokens(server.url), forwarded_client_cert=False, client_certificates=False
        )
        assert authenticate(authenticator, bearer(rotating.token())).identity == "checkout"
        for kid in ("k7", "k8", "k9"):
            assert type(refused(authenticator, bearer(rotating.token(kid=kid)))) is TokenUnknownKey
        assert server.fetches == 1


def test_a_jwks_url_that_cannot_be_fetched_refuses_tokens_and_warns(issuer, caplog):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/jwks.json"
    authenticator = Authenticator(
        tokens(url), forwarded_client_cert=False, client_certificates=False
    )
    with caplog.at_level(logging.WARNING, logger="loyalty_service.api.identity"):
        refusal = refused(authenticator, bearer(issuer.token()))
    assert (type(refusal), refusal.message) == (TokenUnknownKey, "the key set could not be fetched")
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "the JWKS could not be fetched" in caplog.records[0].getMessage()


# --- x-forwarded-client-cert -------------------------------------------------------------

FORWARDED = [
    (f"By=spiffe://ledger.internal;Hash=ab12;URI={CHECKOUT}", CHECKOUT),
    (
        "By=spiffe://edge;URI=spiffe://client,By=spiffe://ledger;URI=spiffe://mesh/proxy",
        "spiffe://mesh/proxy",
    ),
    ("URI=spiffe://one, URI=spiffe://two", "spiffe://two"),
    (f'Hash=ab;Subject="CN=checkout,OU=payments,O=VINR";URI={CHECKOUT}', CHECKOUT),
    (f'URI={CHECKOUT};Subject="CN=checkout,OU=payments,O=VINR"', CHECKOUT),
    ('Hash=ab;Subject="CN=checkout,OU=payments,O=VINR"', "checkout"),
    ('Subject="CN=checkout,OU=payments,O=VINR";URI=', "checkout"),  # Envoy: URI= with none
    (r'Subject="CN=Smith\, John,OU=payments,O=VINR"', "Smith, John"),
    (r'Subject="CN=say \"hi\",O=VINR"', 'say "hi"'),
    ('Subject="CN=first,CN=second,O=VINR"', "first"),
    ("URI=spiffe://a/first;URI=spiffe://a/second;DNS=a.internal", "spiffe://a/first"),
    ('Cert="-----BEGIN%20CERTIFICATE-----%0A,;=";URI=spiffe://a/b', "spiffe://a/b"),
    ('URI="spiffe://a/quoted,value"', "spiffe://a/quoted,value"),
    ('By=x;Subject="CN=other";URI=spiffe://old,By=y;Subject="CN=checkout"', "checkout"),
    ('URI=spiffe://a/b;Subject=""', "spiffe://a/b"),
]


@pytest.fixture
def with_forwarded() -> Authenticator:
    return Authenticator(None, forwarded_client_cert=True, client_certificates=True)


@pytest.mark.parametrize(("header", "identity"), FORWARDED)
def test_a_forwarded_certificate_names_the_nearest_proxys_client(with_forwarded, header, identity):
    caller = authenticate(with_forwarded, ((XFCC, header),))
    assert caller == Authenticated(identity, "forwarded-certificate", None)


def test_repeated_xfcc_headers_are_one_list_whose_last_element_wins(with_forwarded):
    metadata = ((XFCC, "URI=spiffe://a/one,URI=spiffe://a/two"), (XFCC, 'Subject="CN=three"'))
    assert authenticate(with_forwarded, metadata).identity == "three"


@pytest.mark.parametrize(
    "header",
    [
        "",
        "   ",
        "By=spiffe://ledger;Hash=ab12",
        "URI=",
        f"URI={CHECKOUT},By=spiffe://ledger",  # the nearest proxy names no one
        'Subject="CN=unterminated',
        'Subject="CN=a\\"',
        f"URI={CHECKOUT},",
        f",URI={CHECKOUT}",
        f"URI={CHECKOUT};;Hash=a",
        "garbage",
        "=spiffe://a",
        'Subject="O=VINR"',
        'Subject="not a dn"',
        'Subject=""',
        'URI=spiffe://a"b',
        'URI="spiffe://a"b',
        "URI=spiffe://a/\x01",
        "URI=spiffe://" + "a" * 504,
        r'Subject="CN=a\0Ab"',
    ],
)
def test_a_forwarded_certificate_without_an_identity_is_refused(with_forwarded, ca, header):
    _, cert = ca.issue(cn="checkout")
    refusal = refused(with_forwarded, ((XFCC, header),), peer(cert))
    assert (type(refusal), refusal.reason) == (
        ForwardedCertificateMalformed,
        "FORWARDED_CERTIFICATE_MALFORMED",
    )


def test_the_xfcc_header_is_ignored_unless_trusted(ca):
    metadata = ((XFCC, f"URI={CHECKOUT}"),)
    not_trusted = Authenticator(None, forwarded_client_cert=False, client_certificates=True)
    assert type(refused(not_trusted, metadata)) is CredentialsMissing
    _, cert = ca.issue(cn="checkout")
    assert authenticate(not_trusted, metadata, peer(cert)) == Authenticated(
        "checkout", "certificate", None
    )
    # Not even a malformed one is looked at.
    assert authenticate(not_trusted, ((XFCC, '"'),), peer(cert)).source == "certificate"


# --- certificates ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cn", "uri", "identity"),
    [
        ("checkout", CHECKOUT, CHECKOUT),
        (None, CHECKOUT, CHECKOUT),
        ("checkout", None, "checkout"),
    ],
)
def test_a_client_certificate_names_its_uri_san_else_its_cn(ca, cn, uri, identity):
    _, cert = ca.issue(cn=cn, uri=uri)
    authenticator = Authenticator(None, forwarded_client_cert=False, client_certificates=True)
    caller = authenticate(authenticator, (), peer(cert))
    assert caller == Authenticated(identity, "certificate", None)


@pytest.mark.parametrize(
    "cert",
    [
        lambda ca: ca.issue()[1],
        lambda ca: ca.issue(cn="check\x07out")[1],
        lambda ca: ca.issue(uri="spiffe://" + "a" * 600)[1],
        lambda ca: b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
    ],
    ids=["no-name", "control-character", "too-long", "unreadable"],
)
def test_a_client_certificate_without_an_identity_is_refused(ca, cert):
    authenticator = Authenticator(None, forwarded_client_cert=False, client_certificates=True)
    refusal = refused(authenticator, (), peer(cert(ca)))
    assert (type(refusal), refusal.reason) == (
        CertificateWithoutIdentity,
        "CERTIFICATE_WITHOUT_IDENTITY",
    )


@pytest.mark.parametrize(
    ("metadata", "auth_context", "settings"),
    [
        (None, None, {"forwarded_client_cert": True, "client_certificates": True}),
        (
            (),
            {"transport_security_type": [b"insecure"]},
            {"forwarded_client_cert": True, "client_certificates": True},
        ),
        (
            (),
            {"transport_security_type": [b"ssl"]},
            {"forwarded_client_cert": True, "client_certificates": True},
        ),
        ((), "peer", {"forwarded_client_cert": True, "client_certificates": False}),
        (
            (("x-other", "1"), ("trace-bin", b"\x00")),
            None,
            {"forwarded_client_cert": True, "client_certificates": True},
        ),
    ],
    ids=["nothing", "plaintext", "tls-without-client-cert", "certificates-off", "other-headers"],
)
def test_no_applicable_source_is_missing_credentials(ca, metadata, auth_context, settings):
    if auth_context == "peer":
        auth_context = peer(ca.issue(cn="checkout")[1])
    authenticator = Authenticator(None, **settings)
    refusal = refused(authenticator, metadata, auth_context)
    assert (type(refusal), refusal.reason) == (CredentialsMissing, "CREDENTIALS_MISSING")


# --- precedence --------------------------------------------------------------------------


def test_a_token_comes_before_a_forwarded_certificate_and_a_peer_certificate(
    with_tokens, issuer, ca
):
    _, cert = ca.issue(cn="peer")
    xfcc = (XFCC, "URI=spiffe://forwarded")
    token = ("authorization", f"Bearer {issuer.token('token-caller')}")
    assert authenticate(with_tokens, (xfcc, token), peer(cert)).source == "token"
    assert authenticate(with_tokens, (xfcc,), peer(cert)) == Authenticated(
        "spiffe://forwarded", "forwarded-certificate", None
    )
    assert authenticate(with_tokens, (), peer(cert)) == Authenticated("peer", "certificate", None)
    # A bad token is final: no falling back on the certificates.
    expired = ("authorization", f"Bearer {issuer.token(expires_in=-300)}")
    assert type(refused(with_tokens, (xfcc, expired), peer(cert))) is TokenExpired
    # And a bad forwarded certificate is final too.
    assert (
        type(refused(with_tokens, ((XFCC, "junk"),), peer(cert))) is ForwardedCertificateMalformed
    )


def test_an_authorization_header_is_ignored_when_tokens_are_off(ca):
    _, cert = ca.issue(cn="peer")
    authenticator = Authenticator(None, forwarded_client_cert=False, client_certificates=True)
    metadata = (("authorization", "Bearer whatever"),)
    assert authenticate(authenticator, metadata, peer(cert)).identity == "peer"


@pytest.mark.parametrize(
    ("configured", "on"),
    [
        ((False, False, False), False),
        ((True, False, False), True),
        ((False, True, False), True),
        ((False, False, True), True),
    ],
)
def test_on_means_some_source_is_configured(issuer, tmp_path, configured, on):
    token_settings = tokens(issuer.write_jwks(tmp_path / "jwks.json")) if configured[0] else None
    authenticator = Authenticator(
        token_settings, forwarded_client_cert=configured[1], client_certificates=configured[2]
    )
    assert authenticator.on is on


# --- a real mTLS connection --------------------------------------------------------------


def test_a_real_mtls_peer_is_named_by_its_certificate(ca):
    authenticator = Authenticator(None, forwarded_client_cert=False, client_certificates=True)
    server_ca = CertificateAuthority("servers")
    server_key, server_cert = server_ca.issue(cn="localhost", server=True)

    async def whoami(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            caller = await authenticator.authenticate(
                context.invocation_metadata(), context.auth_context()
            )
        except Unauthenticated as error:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, error.reason)
        return f"{caller.source} {caller.identity}".encode()

    async def call(port: int, key: bytes, cert: bytes) -> str:
        credentials = grpc.ssl_channel_credentials(server_ca.pem, key, cert)
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
            reply = await channel.unary_unary("/test.Identity/WhoAmI")(b"", timeout=10)
            return reply.decode()

    async def run() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    "test.Identity", {"WhoAmI": grpc.unary_unary_rpc_method_handler(whoami)}
                )
            ]
        )
        credentials = grpc.ssl_server_credentials(
            [(server_key, server_cert)], root_certificates=ca.pem, require_client_auth=True
        )
        port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        try:
            assert await call(port, *ca.issue(cn="checkout", uri=CHECKOUT)) == (
                f"certificate {CHECKOUT}"
            )
            assert await call(port, *ca.issue(cn="checkout")) == "certificate checkout"
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await call(port, *CertificateAuthority("strangers").issue(cn="checkout"))
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(None)

    asyncio.run(run())
