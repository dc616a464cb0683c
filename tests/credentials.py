"""Credentials made at run time for tests: a certificate authority, a token issuer with its
JWKS, and a JWKS served over HTTP. Nothing here is ever written to the repository."""

from __future__ import annotations

import datetime
import ipaddress
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from jwt.algorithms import ECAlgorithm


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class CertificateAuthority:
    """A CA that issues EC P-256 certificates valid for a day: `pem` is its certificate."""

    def __init__(self, name: str) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self._certificate = (
            self._builder(self._name, self._key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.pem = self._certificate.public_bytes(serialization.Encoding.PEM)

    def _builder(self, subject: x509.Name, public_key: Any) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    def issue(
        self, *, cn: str | None = None, uri: str | None = None, server: bool = False
    ) -> tuple[bytes, bytes]:
        """(key PEM, certificate PEM) of a client certificate with subject CN `cn` and URI SAN
        `uri` (either may be left out), or of a server one for localhost and 127.0.0.1."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
        sans: list[x509.GeneralName] = []
        if server:
            sans += [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        if uri:
            sans.append(x509.UniformResourceIdentifier(uri))
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            self._builder(subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:  # critical when it is all there is of a name (RFC 5280, 4.2.1.6)
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=not cn)
        certificate = builder.sign(self._key, hashes.SHA256())
        return _key_pem(key), certificate.public_bytes(serialization.Encoding.PEM)


class TokenIssuer:
    """An identity provider: ES256 keys by kid, the JWKS of their public halves, tokens."""

    def __init__(self, issuer: str, audience: str, *, kid: str = "k1") -> None:
        self.issuer = issuer
        self.audience = audience
        self._keys: dict[str, ec.EllipticCurvePrivateKey] = {}
        self.rotate(kid)

    def rotate(self, kid: str) -> None:
        """Adds a key `kid` and signs with it from now on; the older keys stay published."""
        self._keys[kid] = ec.generate_private_key(ec.SECP256R1())
        self.kid = kid

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid, key in self._keys.items():
            jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
            keys.append({**jwk, "kid": kid, "alg": "ES256", "use": "sig"})
        return {"keys": keys}

    def write_jwks(self, path: Path | str) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.jwks()))
        return path

    def token(
        self,
        subject: str | None = "checkout",
        *,
        client_id: str | None = None,
        scopes: str = "",
        expires_in: float | None = 300,
        not_before: float | None = None,
        issued_at: float | None = 0,
        audience: str | list[str] | None = None,
        issuer: str | None = None,
        kid: str | None = None,
        sign_with: TokenIssuer | None = None,
        omit: tuple[str, ...] = (),
        **claims: Any,
    ) -> str:
        """A signed JWT. Times are seconds from now (`expires_in=-60`: expired a minute ago);
        None leaves a claim out, as `omit` does for any claim or the header's "kid".
        `sign_with` signs with another issuer's current key, under this issuer's kid; a `kid`
        this issuer has no key for goes on a token signed with its current key."""
        now = time.time()
        payload: dict[str, Any] = {
            "iss": issuer or self.issuer,
            "aud": audience or self.audience,
            "sub": subject,
            "client_id": client_id,
            "scope": scopes or None,
            "exp": None if expires_in is None else int(now + expires_in),
            "nbf": None if not_before is None else int(now + not_before),
            "iat": None if issued_at is None else int(now + issued_at),
            **claims,
        }
        payload = {k: v for k, v in payload.items() if v is not None and k not in omit}
        kid = kid or self.kid
        headers = {} if "kid" in omit else {"kid": kid}
        if sign_with is not None:
            key = sign_with._keys[sign_with.kid]
        else:
            key = self._keys.get(kid, self._keys[self.kid])
        return jwt.encode(payload, key, algorithm="ES256", headers=headers)


class JwksServer:
    """Serves a TokenIssuer's current JWKS at `url` while in a `with` block, counting the
    fetches."""

    def __init__(self, issuer: TokenIssuer) -> None:
        self.issuer = issuer
        self.fetches = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.fetches += 1
                body = json.dumps(owner.issuer.jwks()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # quiet test output
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/.well-known/jwks.json"

    def __enter__(self) -> JwksServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
