"""Every call of our services is admitted first: its caller authenticated, its scope
checked; the servicers then find the caller in `current()`."""

from __future__ import annotations

import logging
import tomllib
from contextvars import ContextVar
from pathlib import Path

import grpc

from ..config import Settings
from ..domain.callers import ANYONE, Caller, Policy, Scope, policy_from
from ..domain.errors import LedgerError, MissingScope, PermissionDenied, Unauthenticated
from .errors import to_status
from .identity import Authenticator, TokenSettings
from .scopes import SCOPES

log = logging.getLogger(__name__)

_CALLER: ContextVar[Caller] = ContextVar("caller")


def current() -> Caller:
    """The caller of the call being served (set by Guard.refusal)."""
    return _CALLER.get()


def missing_scope(scope: Scope | None, method: str) -> MissingScope:
    needed = scope.value if scope else "(none: the method is not in the scope table)"
    return MissingScope(f"{method} needs the scope {needed}", scope=needed, method=method)


def require(caller: Caller, scope: Scope, method: str) -> None:
    """Raises (and logs) MISSING_SCOPE unless the caller holds `scope`."""
    if scope not in caller.scopes:
        error = missing_scope(scope, method)
        _log_refusal(method, caller.identity, error)
        raise error


class Guard:
    """Admits a call: authenticates its caller (no identity source: everyone is ANYONE),
    and refuses it unless the caller holds the method's scope (api.scopes.SCOPES). A
    refused call is answered UNAUTHENTICATED or PERMISSION_DENIED before its request is
    looked at, so it writes nothing, and is logged with its caller and method."""

    def __init__(self, authenticator: Authenticator | None, policy: Policy | None) -> None:
        self.authenticator = authenticator
        self.policy = policy

    async def refusal(self, method: str, context: grpc.aio.ServicerContext) -> grpc.Status | None:
        """Sets current() for the call and returns None, or returns the status that refuses
        it. (gRPC runs each call in a task of its own, so what one call sets no other call
        sees.)"""
        caller = ANYONE
        who = ""
        try:
            if self.authenticator is not None and self.policy is not None:
                found = await self.authenticator.authenticate(
                    context.invocation_metadata(), context.auth_context()
                )
                who = found.identity
                caller = self.policy.caller(found.identity, found.scopes)
            scope = SCOPES.get(method)
            if scope is None or scope not in caller.scopes:
                raise missing_scope(scope, method)
        except (Unauthenticated, PermissionDenied) as error:
            _log_refusal(method, who or f"unauthenticated {context.peer()}", error)
            return to_status(error)
        _CALLER.set(caller)
        return None


def _log_refusal(method: str, who: str, error: LedgerError) -> None:
    log.warning("refused %s for %s: %s (%s)", method, who, error.reason, error.message)


def guard(settings: Settings) -> Guard:
    """The guard the settings ask for."""
    if not settings.authenticates:
        return Guard(None, None)
    tokens = None
    if settings.jwt_jwks:
        tokens = TokenSettings(
            jwks=settings.jwt_jwks,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            leeway=settings.jwt_leeway,
            algorithms=tuple(a.strip() for a in settings.jwt_algorithms.split(",") if a.strip()),
        )
    authenticator = Authenticator(
        tokens,
        forwarded_client_cert=settings.trust_forwarded_client_cert,
        client_certificates=bool(settings.tls_client_ca_file),
    )
    with Path(settings.policy_file).open("rb") as file:
        policy = policy_from(tomllib.load(file))
    return Guard(authenticator, policy)
