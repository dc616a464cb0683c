"""Programs, their tiers and earning rules: validation, versions and the tier rule."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field, replace
from datetime import datetime

from .errors import CurrencyLocked, FieldViolation, InvalidArgument, ProgramNotActive
from .ids import MAX_AMOUNT, new_id

CURRENCY = re.compile(r"^[A-Z]{3}$")  # ISO 4217


MAX_PROGRAM_NAME_LENGTH = 200


MAX_TIERS = 20


MAX_TIER_NAME_LENGTH = 40


class ProgramStatus(enum.StrEnum):
    ACTIVE = "ACTIVE"
    ARCHIVED = "ARCHIVED"


@dataclass(frozen=True)
class Tier:
    name: str
    # The lifetime points from which a member is in this tier.
    lifetime_points: int


class RuleTrigger(enum.StrEnum):
    PAYMENT_COMPLETED = "payment.completed"
    ACCOUNT_CREATED = "loyalty.account.created"


@dataclass(frozen=True)
class TierMultiplier:
    tier: str
    multiplier: str  # a decimal with up to 2 places, e.g. "1.5"


@dataclass(frozen=True)
class EarningRule:
    """How points are earned: from payments, or as a welcome bonus when an account is
    created. In a request, `id` "" means a new rule and `version` is ignored."""

    trigger: RuleTrigger
    name: str = ""
    # Payment rules: points per unit of the currency (a decimal with up to 4 places), the
    # smallest amount that earns (minor units), the most points per payment (0: no cap),
    # multipliers by tier, and the window `occurred_at` must fall in.
    points_per_unit: str = ""
    min_amount: int = 0
    max_points: int = 0
    tier_multipliers: list[TierMultiplier] = field(default_factory=list)
    start_time: datetime | None = None
    end_time: datetime | None = None
    # Welcome rules: the bonus.
    points: int = 0
    id: str = ""
    version: int = 0


@dataclass(frozen=True)
class HoldPolicy:
    """How long a program's holds last: the time-to-live a request that names none gets,
    and the longest a request may ask for (card authorisations last days)."""

    default_ttl_seconds: int = 15 * 60
    max_ttl_seconds: int = 7 * 24 * 3600


# The longest hold time-to-live any program may allow.
HOLD_TTL_CEILING_SECONDS = 366 * 24 * 3600


def ttl_violations(field_path: str, seconds: int, nanos: int = 0) -> list[FieldViolation]:
    """A time-to-live is whole seconds, at least one, at most HOLD_TTL_CEILING_SECONDS."""
    if nanos or not 1 <= seconds <= HOLD_TTL_CEILING_SECONDS:
        ceiling = HOLD_TTL_CEILING_SECONDS
        return [FieldViolation(field_path, f"must be whole seconds, from 1 to {ceiling}")]
    return []


def hold_policy_violations(field_path: str, policy: HoldPolicy) -> list[FieldViolation]:
    """Beyond each time-to-live's own bounds (ttl_violations): the default within the
    maximum, once both are within theirs."""
    within = not ttl_violations("", policy.default_ttl_seconds) and not ttl_violations(
        "", policy.max_ttl_seconds
    )
    if within and policy.default_ttl_seconds > policy.max_ttl_seconds:
        return [FieldViolation(f"{field_path}.default_ttl", "must not exceed max_ttl")]
    return []


@dataclass(frozen=True)
class Program:
    id: str
    name: str
    currency: str
    auto_enroll: bool
    tiers: list[Tier]  # in order of threshold
    status: ProgramStatus
    create_time: datetime
    update_time: datetime
    earning_rules: list[EarningRule] = field(default_factory=list)
    # The identity of the caller that made the latest change.
    actor: str = ""
    hold_policy: HoldPolicy = field(default_factory=HoldPolicy)


def tier_violations(field_path: str, tiers: list[Tier]) -> list[FieldViolation]:
    """What is wrong with a program's tiers: at most MAX_TIERS, names 1 to 40 characters, not
    blank and unique ignoring case (members and staff read "Gold" and "gold" as one tier),
    thresholds at least 0 and strictly increasing (so each member is in one tier)."""
    found = []
    if len(tiers) > MAX_TIERS:
        found.append(FieldViolation(field_path, f"has more than {MAX_TIERS} tiers"))
    seen: set[str] = set()
    for index, tier in enumerate(tiers):
        path = f"{field_path}[{index}]"
        if not 1 <= len(tier.name) <= MAX_TIER_NAME_LENGTH:
            found.append(
                FieldViolation(f"{path}.name", f"must be 1 to {MAX_TIER_NAME_LENGTH} characters")
            )
        elif "\x00" in tier.name:
            found.append(FieldViolation(f"{path}.name", "must not contain the character U+0000"))
        elif not tier.name.strip():
            found.append(FieldViolation(f"{path}.name", "must not be blank"))
        elif tier.name.casefold() in seen:
            found.append(FieldViolation(f"{path}.name", f"repeats the tier name {tier.name!r}"))
        seen.add(tier.name.casefold())
        if tier.lifetime_points < 0:
            found.append(FieldViolation(f"{path}.lifetime_points", "must not be negative"))
        elif index and tier.lifetime_points <= tiers[index - 1].lifetime_points:
            found.append(
                FieldViolation(
                    f"{path}.lifetime_points",
                    f"must be greater than the previous tier's"
                    f" ({tiers[index - 1].lifetime_points})",
                )
            )
    return found


def require_program_active(program: Program) -> None:
    if program.status is not ProgramStatus.ACTIVE:
        raise ProgramNotActive(
            f"program {program.id} is {program.status}, not ACTIVE: it takes no new accounts",
            program=program.id,
            status=program.status,
        )


def check_currency_change(program: Program, currency: str, has_accounts: bool) -> None:
    """The currency may change only while the program has no account: its accounts'
    balances were earned in it, and would silently change value."""
    if currency != program.currency and has_accounts:
        raise CurrencyLocked(
            f"program {program.id} has accounts, whose points were earned in"
            f" {program.currency}; its currency cannot change to {currency}",
            program=program.id,
            currency=program.currency,
            requested=currency,
        )


def tier_for(lifetime_before: int, lifetime_points: int, tiers: list[Tier], current: str) -> str:
    """The tier of an account whose lifetime points went from `lifetime_before` to
    `lifetime_points`: the highest of the program's tiers (in order of threshold) whose
    threshold they reach, but never one below `current`.

    So tiers never demote: if a program's thresholds are raised later, its accounts keep the
    tiers they reached. `current` ranks where it stands in `tiers` ("" below them all). A
    current tier the program no longer has (renamed or removed) cannot be ranked, so it is
    kept until the points cross a threshold: only a tier whose threshold lies above
    `lifetime_before` replaces it. The posting kernel has the same rule in SQL
    (tier_after, migration 0006); tests/ledger/test_kernel.py runs one table against both.
    """
    names = [tier.name for tier in tiers]
    held = names.index(current) if current in names else -1
    unknown = current != "" and held == -1
    reached = -1
    for index, tier in enumerate(tiers):
        if tier.lifetime_points <= lifetime_points and (
            not unknown or tier.lifetime_points > lifetime_before
        ):
            reached = index
    return tiers[reached].name if reached > held else current


@dataclass(frozen=True)
class NewProgram:
    """A validated request to create a program."""

    name: str
    currency: str
    auto_enroll: bool = False
    tiers: list[Tier] = field(default_factory=list)
    status: ProgramStatus = ProgramStatus.ACTIVE
    earning_rules: list[EarningRule] = field(default_factory=list)
    hold_policy: HoldPolicy = field(default_factory=HoldPolicy)


@dataclass(frozen=True)
class ProgramChanges:
    """A validated UpdateProgram; None leaves a field as it is."""

    name: str | None = None
    currency: str | None = None
    auto_enroll: bool | None = None
    tiers: list[Tier] | None = None
    status: ProgramStatus | None = None
    earning_rules: list[EarningRule] | None = None
    hold_policy: HoldPolicy | None = None


MAX_RULES = 20


MAX_RULE_NAME_LENGTH = 200


MAX_POINTS_PER_UNIT = 1_000_000


MAX_MULTIPLIER = 100


MAX_PAYMENT_AMOUNT = 10**15  # minor units


RATE_PLACES = 4  # decimal places of points_per_unit


MULTIPLIER_PLACES = 2


_DECIMAL = re.compile(r"([0-9]+)(?:\.([0-9]+))?")


def scaled(decimal: str, places: int) -> int | None:
    """A decimal string as an integer count of 10^-places, or None if it is not a plain
    decimal with at most `places` decimal places. Integers only: no float ever touches a
    points computation."""
    match = _DECIMAL.fullmatch(decimal)
    if match is None or len(match.group(2) or "") > places or len(match.group(1)) > 12:
        return None
    whole, fraction = match.group(1), match.group(2) or ""
    return int(whole) * 10**places + int(fraction.ljust(places, "0") or "0")


def _decimal_violation(text: str, places: int, maximum: int) -> str | None:
    value = scaled(text, places)
    if value is None:
        return f"must be a plain decimal with at most {places} decimal places, e.g. '1.5'"
    if not 0 < value <= maximum * 10**places:
        return f"must be greater than 0 and at most {maximum}"
    return None


def rule_violations(
    field_path: str, rules: list[EarningRule], tiers: list[Tier]
) -> list[FieldViolation]:
    """What is wrong with a program's earning rules, given the program's `tiers`."""
    found = []
    if len(rules) > MAX_RULES:
        found.append(FieldViolation(field_path, f"has more than {MAX_RULES} rules"))
    tier_names = {tier.name for tier in tiers}
    for index, rule in enumerate(rules):
        path = f"{field_path}[{index}]"

        def add(name: str, description: str) -> None:
            found.append(FieldViolation(f"{path}.{name}", description))  # noqa: B023

        if len(rule.name) > MAX_RULE_NAME_LENGTH:
            add("name", f"is longer than {MAX_RULE_NAME_LENGTH} characters")
        elif "\x00" in rule.name:
            add("name", "must not contain the character U+0000")
        if rule.trigger is RuleTrigger.ACCOUNT_CREATED:
            if not 1 <= rule.points <= MAX_AMOUNT:
                add("points", f"must be between 1 and {MAX_AMOUNT} for a welcome rule")
            payment_fields = {
                "points_per_unit": rule.points_per_unit != "",
                "min_amount": rule.min_amount != 0,
                "max_points": rule.max_points != 0,
                "tier_multipliers": bool(rule.tier_multipliers),
                "start_time": rule.start_time is not None,
                "end_time": rule.end_time is not None,
            }
            for name, is_set in payment_fields.items():
                if is_set:
                    add(name, "applies to payment rules only; must be unset")
            continue
        if rule.points:
            add("points", "applies to welcome rules only; must be 0")
        if not rule.points_per_unit:
            add("points_per_unit", "is required")
        elif problem := _decimal_violation(rule.points_per_unit, RATE_PLACES, MAX_POINTS_PER_UNIT):
            add("points_per_unit", problem)
        if not 0 <= rule.min_amount <= MAX_PAYMENT_AMOUNT:
            add("min_amount", f"must be between 0 and {MAX_PAYMENT_AMOUNT}")
        if not 0 <= rule.max_points <= MAX_AMOUNT:
            add("max_points", f"must be between 0 (no cap) and {MAX_AMOUNT}")
        if rule.start_time and rule.end_time and rule.start_time >= rule.end_time:
            add("end_time", "must be after start_time")
        seen: set[str] = set()
        for m_index, multiplier in enumerate(rule.tier_multipliers):
            m_path = f"tier_multipliers[{m_index}]"
            if multiplier.tier not in tier_names:
                add(f"{m_path}.tier", f"{multiplier.tier[:40]!r} is not a tier of the program")
            elif multiplier.tier in seen:
                add(f"{m_path}.tier", f"repeats the tier {multiplier.tier!r}")
            seen.add(multiplier.tier)
            problem = _decimal_violation(multiplier.multiplier, MULTIPLIER_PLACES, MAX_MULTIPLIER)
            if problem:
                add(f"{m_path}.multiplier", problem)
    return found


def versioned_rules(
    field_path: str, current: list[EarningRule], requested: list[EarningRule]
) -> list[EarningRule]:
    """The rules after a change: a requested rule with the id of a current one keeps the id,
    and its version goes up by one if anything in it changed; one without an id is new, at
    version 1. Raises InvalidArgument for ids the program does not have, or repeats."""
    by_id = {rule.id: rule for rule in current}
    found, seen, result = [], set(), []
    for index, rule in enumerate(requested):
        if not rule.id:
            result.append(replace(rule, id=new_id("rule_"), version=1))
            continue
        if rule.id not in by_id:
            found.append(
                FieldViolation(f"{field_path}[{index}].id", "is not a rule of the program")
            )
        elif rule.id in seen:
            found.append(FieldViolation(f"{field_path}[{index}].id", "repeats a rule"))
        else:
            old = by_id[rule.id]
            if _meaning(replace(rule, version=old.version)) == _meaning(old):
                result.append(old)  # as it was saved: its version says what it is
            else:
                result.append(replace(rule, version=old.version + 1))
        seen.add(rule.id)
    if found:
        raise InvalidArgument(found)
    return result


def _meaning(rule: EarningRule) -> EarningRule:
    """The rule with its decimals in one spelling, so "1.50" for "1.5" is no change."""

    def same(text: str, places: int) -> str:
        value = scaled(text, places)
        return text if value is None else str(value)

    return replace(
        rule,
        points_per_unit=same(rule.points_per_unit, RATE_PLACES),
        tier_multipliers=[
            replace(m, multiplier=same(m.multiplier, MULTIPLIER_PLACES))
            for m in rule.tier_multipliers
        ],
    )


def starting_tier(program: Program) -> str:
    """The tier of a new account: the one its lifetime points of 0 reach (if any tier starts
    at 0)."""
    return tier_for(0, 0, program.tiers, "")
