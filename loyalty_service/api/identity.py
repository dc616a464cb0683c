"""Who is calling: a bearer token, a forwarded client certificate or our own mTLS peer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import jwt
from cryptography import x509
from cryptography.x509.oid import NameOID

from ..domain.callers import MAX_IDENTITY_LENGTH
from ..domain.errors import (
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
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# Public-key algorithms only: an HS* "key" in a JWKS would be a published shared secret.
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
# A JWKS URL's fetch blocks a worker thread; past this the call fails rather than hangs.
JWKS_FETCH_TIMEOUT = 5.0
XFCC = "x-forwarded-client-cert"


@dataclass(frozen=True)
class Authenticated:
    identity: str  # who is calling
    source: str  # "token" | "certificate" | "forwarded-certificate"
    scopes: frozenset[str] | None  # a token's scopes; None for certificates


@dataclass(frozen=True)
class TokenSettings:
    jwks: str  # a file path, or an http(s):// URL of a JWKS
    issuer: str
    audience: str
    leeway: float = 30.0  # seconds of clock skew allowed on exp/nbf/iat
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    # An unknown kid refetches a URL's JWKS at most this often: tokens with made-up kids
    # must not turn into a stream of requests to the identity provider.
    refresh_cooldown: float = 30.0


class Authenticator:
    def __init__(
        self,
        tokens: TokenSettings | None,
        *,
        forwarded_client_cert: bool,
        client_certificates: bool,
    ) -> None:
        self._tokens = tokens
        self._forwarded_client_cert = forwarded_client_cert
        self._client_certificates = client_certificates
        self._jwk_set: jwt.PyJWKSet | None = None
        self._jwk_client: jwt.PyJWKClient | None = None
        if tokens is None:
            return
        if not tokens.algorithms or not set(tokens.algorithms) <= ASYMMETRIC_ALGORITHMS:
            raise ValueError(f"token algorithms must be some of {sorted(ASYMMETRIC_ALGORITHMS)}")
        if tokens.jwks.startswith(("http://", "https://")):
            # Fetched on first use, cached, and refetched for a kid it does not hold.
            self._jwk_client = jwt.PyJWKClient(
                tokens.jwks,
                timeout=JWKS_FETCH_TIMEOUT,
                cooldown_duration=tokens.refresh_cooldown,
            )
        else:
            # Read once, at start: a bad file stops the service, not its callers.
            self._jwk_set = jwt.PyJWKSet.from_json(Path(tokens.jwks).read_text())

    @property
    def on(self) -> bool:
        return self._tokens is not None or self._forwarded_client_cert or self._client_certificates

    async def authenticate(
        self,
        metadata: Iterable[tuple[str, str | bytes]] | None,
        auth_context: Mapping[str, Sequence[bytes]] | None,
    ) -> Authenticated:
        headers: dict[str, list[str]] = {}
        for key, value in metadata or ():
            if key in ("authorization", XFCC):
                text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
                headers.setdefault(key, []).append(text)
        # First source that applies wins; a source that applies and fails is final.
        if self._tokens is not None and "authorization" in headers:
            return await self._from_token(self._tokens, headers["authorization"])
        if self._forwarded_client_cert and XFCC in headers:
            # Repeated header values are one list, as HTTP joins them.
            return _from_forwarded(",".join(headers[XFCC]))
        pem = (auth_context or {}).get("x509_pem_cert")
        if self._client_certificates and pem:
            return _from_certificate(pem[0])
        raise CredentialsMissing("no credentials: a bearer token or a client certificate")

    async def _from_token(self, settings: TokenSettings, values: list[str]) -> Authenticated:
        parts = values[0].split() if len(values) == 1 else []
        if len(parts) != 2 or parts[0].lower() != "bearer":
            raise TokenMalformed("the authorization header is not one `Bearer <token>`")
        token = parts[1]
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.InvalidTokenError:
            raise TokenMalformed("the bearer token is not a JWT") from None
        key = await self._signing_key(kid)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=list(settings.algorithms),
                audience=settings.audience,
                issuer=settings.issuer,
                leeway=settings.leeway,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenExpired("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenNotYetValid("the token is not valid yet") from None
        except jwt.InvalidSignatureError:
            raise TokenBadSignature("the token's signature does not verify") from None
        except jwt.InvalidAudienceError:
            raise TokenWrongAudience(
                "the token is for another audience", expected=settings.audience
            ) from None
        except jwt.InvalidIssuerError:
            raise TokenWrongIssuer(
                "the token is from another issuer", expected=settings.issuer
            ) from None
        except jwt.MissingRequiredClaimError as error:
            raise TokenMalformed("the token lacks a required claim", claim=error.claim) from None
        except jwt.InvalidTokenError:
            raise TokenMalformed("the token is not a valid JWT") from None
        identity = claims.get("client_id")
        if identity is None:
            identity = claims.get("sub")
        if not isinstance(identity, str) or not _acceptable(identity):
            raise TokenMalformed("the token names no valid caller (client_id or sub)")
        scopes = claims.get("scope")
        if scopes is None:
            scopes = claims.get("scp", "")  # Azure AD (a string), Okta (a list)
        return Authenticated(identity, "token", _scopes(scopes))

    async def _signing_key(self, kid: str | None) -> jwt.PyJWK:
        client = self._jwk_client
        if client is None:
            assert self._jwk_set is not None
            keys = self._jwk_set
        elif kid is None:
            keys = await _fetched(client.get_jwk_set)
        else:
            # Most calls find their key in the cached set: no thread for those.
            cached = client.jwk_set_cache.get() if client.jwk_set_cache else None
            found = _key(cached, kid) if cached else None
            # PyJWKClient refetches (at most every refresh_cooldown) for a kid it lacks.
            if found is not None:
                return found
            return await _fetched(client.get_signing_key, kid)
        found = _key(keys, kid)
        if found is None:
            raise TokenUnknownKey("no key of the key set matches the token's key id")
        return found


async def _fetched(call: Callable[..., T], *args: object) -> T:
    """`call` (which may fetch the JWKS, in blocking urllib) run in a worker thread."""
    try:
        return await asyncio.to_thread(call, *args)
    except (jwt.PyJWKClientConnectionError, jwt.PyJWKSetError, OSError, ValueError) as error:
        log.warning("the JWKS could not be fetched: %s", error)
        raise TokenUnknownKey("the key set could not be fetched") from None
    except jwt.PyJWKClientError:  # no key for the kid, even after one refetch
        raise TokenUnknownKey("no key of the key set matches the token's key id") from None


def _key(keys: jwt.PyJWKSet, kid: str | None) -> jwt.PyJWK | None:
    signing = [key for key in keys.keys if key.public_key_use in ("sig", None)]
    if kid is None:
        # A token may omit its kid only when there is no choice of key.
        return signing[0] if len(signing) == 1 else None
    return next((key for key in signing if key.key_id == kid), None)


def _scopes(value: Any) -> frozenset[str]:
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list) and all(isinstance(scope, str) for scope in value):
        return frozenset(value)
    raise TokenMalformed("the token's scope claim is neither a string nor a list of strings")


def _acceptable(identity: str) -> bool:
    # Identities end up in logs and in the ledger's actor column: printable, bounded.
    return 0 < len(identity) <= MAX_IDENTITY_LENGTH and identity.isprintable()


def _from_certificate(pem: bytes) -> Authenticated:
    # The TLS handshake verified the chain; this only reads the name it proves.
    try:
        certificate = x509.load_pem_x509_certificate(pem)
        try:
            names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            uris = names.value.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        identity = uris[0] if uris else _common_name(certificate.subject)
    except ValueError:
        raise CertificateWithoutIdentity("the client certificate could not be read") from None
    if identity is None or not _acceptable(identity):
        raise CertificateWithoutIdentity("the client certificate names no valid URI SAN or CN")
    return Authenticated(identity, "certificate", None)


def _common_name(name: x509.Name) -> str | None:
    # The most specific CN: the last in the certificate, the first in an RFC 4514 string.
    names = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[-1].value if names else None
    return value if isinstance(value, str) else None


def _from_forwarded(header: str) -> Authenticated:
    # The last element is the one the proxy nearest to us added: the only one it vouches for.
    pairs = _xfcc_elements(header)[-1]
    uris = [
        _unescaped(value) if quoted else value
        for key, value, quoted in pairs
        if key.lower() == "uri" and value  # Envoy sends `URI=` for a certificate without one
    ]
    subjects = [value for key, value, _ in pairs if key.lower() == "subject"]
    identity: str | None = None
    if uris:
        identity = uris[0]
    elif subjects:
        try:
            # Subject keeps its DN escapes (`\,` `\"`): the DN parser reads them.
            identity = _common_name(x509.Name.from_rfc4514_string(subjects[0]))
        except ValueError:
            raise ForwardedCertificateMalformed(f"the {XFCC} Subject is not a DN") from None
    if identity is None or not _acceptable(identity):
        raise ForwardedCertificateMalformed(f"the {XFCC} header names no valid URI or CN")
    return Authenticated(identity, "forwarded-certificate", None)


def _xfcc_elements(header: str) -> list[list[tuple[str, str, bool]]]:
    """Envoy's `Key=Value;Key="Quoted, value";...,Key=...`: elements of (key, value, quoted).
    A quoted value is kept as written between its quotes, backslash escapes included."""
    malformed = ForwardedCertificateMalformed(f"the {XFCC} header could not be parsed")
    elements: list[list[tuple[str, str, bool]]] = []
    pairs: list[tuple[str, str, bool]] = []
    pos, end = 0, len(header)
    while True:
        equals = header.find("=", pos)
        key = header[pos:equals].strip() if equals >= 0 else ""
        if not key or any(c in key for c in ',;"'):
            raise malformed
        pos = equals + 1
        if header.startswith('"', pos):
            close = pos + 1
            while close < end and header[close] != '"':
                close += 2 if header[close] == "\\" else 1
            if close >= end:
                raise malformed
            value, quoted, pos = header[pos + 1 : close], True, close + 1
            while pos < end and header[pos] == " ":
                pos += 1
        else:
            stop = pos
            while stop < end and header[stop] not in ",;":
                stop += 1
            value, quoted, pos = header[pos:stop].strip(), False, stop
            if '"' in value:
                raise malformed
        pairs.append((key, value, quoted))
        if pos >= end:
            elements.append(pairs)
            return elements
        if header[pos] not in ",;":
            raise malformed
        if header[pos] == ",":
            elements.append(pairs)
            pairs = []
        pos += 1


def _unescaped(value: str) -> str:
    out, escaped = [], False
    for char in value:
        if escaped or char != "\\":
            out.append(char)
        escaped = not escaped and char == "\\"
    return "".join(out)
