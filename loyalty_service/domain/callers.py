"""Callers: who may do what (scopes), on which programs, by the policy's grants."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

# The actor of every change when the service authenticates no one (make run, a trusted
# network): all callers are one.
ANONYMOUS = "anonymous"
MAX_IDENTITY_LENGTH = 512


class Scope(enum.StrEnum):
    ACCOUNTS_READ = "accounts.read"
    ACCOUNTS_WRITE = "accounts.write"
    POINTS_READ = "points.read"
    POINTS_WRITE = "points.write"  # EARN and REDEEM
    POINTS_ADJUST = "points.adjust"  # ADJUST and EXPIRE by hand, reversals
    PAYMENTS_WRITE = "payments.write"
    PROGRAMS_READ = "programs.read"
    PROGRAMS_ADMIN = "programs.admin"
    EVENTS_READ = "events.read"


@dataclass(frozen=True)
class Caller:
    """Who is calling (the actor its changes record), its scopes and the programs it may
    touch (None: every program)."""

    identity: str
    scopes: frozenset[Scope]
    programs: frozenset[str] | None = None

    def sees(self, program: str) -> bool:
        """Whether objects of `program` exist for this caller."""
        return self.programs is None or program in self.programs


# A list or subscription of a caller limited to some programs names a program or account:
# it could otherwise read other programs' objects.
LIMITED_CALLER = "is required of a caller limited to some programs"


# The caller when no identity source is configured.
ANYONE = Caller(ANONYMOUS, frozenset(Scope))


@dataclass(frozen=True)
class Grant:
    """What the policy grants the identities `pattern` names: exactly one, or, ending in
    `*`, every identity that starts with what precedes it."""

    pattern: str
    scopes: frozenset[Scope]
    programs: frozenset[str] | None = None

    def names(self, identity: str) -> bool:
        if self.pattern.endswith("*"):
            return identity.startswith(self.pattern[:-1])
        return identity == self.pattern


@dataclass(frozen=True)
class Policy:
    grants: tuple[Grant, ...]

    def grant_for(self, identity: str) -> Grant | None:
        """The one grant that applies: the exact one, else the wildcard with the longest
        prefix. Grants never add up: what one names is all an identity gets."""
        named = [g for g in self.grants if g.names(identity)]
        exact = [g for g in named if g.pattern == identity]
        if exact:
            return exact[0]
        return max(named, key=lambda g: len(g.pattern), default=None)

    def caller(self, identity: str, token_scopes: frozenset[str] | None) -> Caller:
        """The caller `identity` is. A token's scopes are granted only as far as the policy
        grants them too: both the token's issuer and this service's policy must agree
        before a caller may, say, adjust points. An identity no grant names has no scope."""
        grant = self.grant_for(identity)
        if grant is None:
            return Caller(identity, frozenset(), frozenset())
        scopes = grant.scopes
        if token_scopes is not None:
            scopes = frozenset(s for s in scopes if s.value in token_scopes)
        return Caller(identity, scopes, grant.programs)


class PolicyError(ValueError):
    """A policy file that says something this service cannot follow."""


def policy_from(document: Mapping[str, object]) -> Policy:
    """A policy from its parsed TOML: `[[callers]]` tables with `identity`, `scopes` and,
    optionally, `programs`."""
    entries = document.get("callers", [])
    unknown = set(document) - {"callers"}
    if unknown or not isinstance(entries, list):
        raise PolicyError(f"a policy holds [[callers]] tables only, not {sorted(unknown)}")
    grants, patterns = [], set()
    for number, entry in enumerate(entries, 1):
        where = f"callers #{number}"
        if not isinstance(entry, dict) or set(entry) - {"identity", "scopes", "programs"}:
            raise PolicyError(f"{where}: takes identity, scopes and programs only")
        pattern = entry.get("identity")
        if not isinstance(pattern, str) or not pattern or "*" in pattern[:-1]:
            raise PolicyError(f"{where}: identity must be text, with `*` only at its end")
        if pattern in patterns:
            raise PolicyError(f"{where}: {pattern} is granted twice")
        patterns.add(pattern)
        scopes = _strings(entry.get("scopes"), where, "scopes")
        try:
            granted = frozenset(Scope(s) for s in scopes)
        except ValueError:
            known = ", ".join(s.value for s in Scope)
            raise PolicyError(f"{where}: scopes are {known}") from None
        programs = entry.get("programs")
        allowed = None if programs is None else frozenset(_strings(programs, where, "programs"))
        grants.append(Grant(pattern, granted, allowed))
    return Policy(tuple(grants))


def _strings(value: object, where: str, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"{where}: {name} must be a list of strings")
    return value
