"""The LoyaltyPrograms servicer, and the parsing of its requests."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import grpc

from .. import domain
from ..domain.programs import (
    EarningRule,
    HoldPolicy,
    NewProgram,
    ProgramChanges,
    ProgramStatus,
    RuleTrigger,
    Tier,
    TierMultiplier,
)
from ..ledger import Ledger
from ..pb import programs_pb2, programs_pb2_grpc
from . import callers, messages, paging, parsing
from .errors import translated
from .paging import PageTokens
from .parsing import Violations

Context = grpc.aio.ServicerContext

_PROGRAM_STATUS_FROM_PB = {v: k for k, v in messages.PROGRAM_STATUS_TO_PB.items()}
_TRIGGER_FROM_PB = {v: k for k, v in messages.TRIGGER_TO_PB.items()}
# The fields UpdateProgram may change (AIP-134 paths).
PROGRAM_PATHS = (
    "name", "currency", "auto_enroll", "tiers", "earning_rules", "status", "hold_policy",
)  # fmt: skip


@dataclass(frozen=True)
class LoyaltyPrograms(programs_pb2_grpc.LoyaltyProgramsServicer):
    ledger: Ledger
    tokens: PageTokens

    @translated
    async def CreateProgram(
        self, request: programs_pb2.CreateProgramRequest, context: Context
    ) -> programs_pb2.Program:
        program_id, new = new_program(request)
        program = await self.ledger.create_program(
            callers.current(), program_id, new, request.request_id
        )
        return messages.program_pb(program)

    @translated
    async def GetProgram(
        self, request: programs_pb2.GetProgramRequest, context: Context
    ) -> programs_pb2.Program:
        program_id = parsing.single_id("id", request.id, domain.ids.PROGRAM_ID)
        return messages.program_pb(await self.ledger.get_program(callers.current(), program_id))

    @translated
    async def GetEarningRule(
        self, request: programs_pb2.GetEarningRuleRequest, context: Context
    ) -> programs_pb2.EarningRule:
        rule_id, version = rule_version(request)
        return messages.rule_pb(
            await self.ledger.get_earning_rule(callers.current(), rule_id, version)
        )

    @translated
    async def ListPrograms(
        self, request: programs_pb2.ListProgramsRequest, context: Context
    ) -> programs_pb2.ListProgramsResponse:
        status = program_status_filter(request)
        items, next_page_token = await paging.page(
            self.tokens,
            request,
            "ListPrograms",
            status,
            functools.partial(self.ledger.list_programs, callers.current()),
            messages.program_pb,
        )
        return programs_pb2.ListProgramsResponse(programs=items, next_page_token=next_page_token)

    @translated
    async def UpdateProgram(
        self, request: programs_pb2.UpdateProgramRequest, context: Context
    ) -> programs_pb2.Program:
        program_id, changes = program_changes(request)
        program = await self.ledger.update_program(
            callers.current(), program_id, changes, request.request_id
        )
        return messages.program_pb(program)


def _program_name(v: Violations, field_path: str, value: str) -> str:
    if not value.strip():
        v.add(field_path, "is required")
    return v.text(field_path, value, domain.programs.MAX_PROGRAM_NAME_LENGTH)


def _tiers(v: Violations, field_path: str, values: Sequence[programs_pb2.Tier]) -> list[Tier]:
    v.at_most(field_path, values, domain.programs.MAX_TIERS, "tiers")
    tiers = [Tier(t.name, t.lifetime_points) for t in values]
    v.extend(domain.programs.tier_violations(field_path, tiers))
    return tiers


def _rules(
    v: Violations, field_path: str, values: Sequence[programs_pb2.EarningRule]
) -> list[EarningRule]:
    """The rules as asked for; what they say is checked by domain.programs.rule_violations, against
    the tiers the program will have."""
    v.at_most(field_path, values, domain.programs.MAX_RULES, "rules")
    rules = []
    for index, rule in enumerate(values):
        path = f"{field_path}[{index}]"
        trigger = v.enum(f"{path}.trigger", rule.trigger, _TRIGGER_FROM_PB, required=True)
        multipliers = rule.tier_multipliers
        v.at_most(f"{path}.tier_multipliers", multipliers, domain.programs.MAX_TIERS, "entries")
        rules.append(
            EarningRule(
                trigger=trigger or RuleTrigger.PAYMENT_COMPLETED,
                name=rule.name,
                points_per_unit=rule.points_per_unit,
                min_amount=rule.min_amount,
                max_points=rule.max_points,
                tier_multipliers=[TierMultiplier(m.tier, m.multiplier) for m in multipliers],
                start_time=v.timestamp(f"{path}.start_time", rule.start_time)
                if rule.HasField("start_time")
                else None,
                end_time=v.timestamp(f"{path}.end_time", rule.end_time)
                if rule.HasField("end_time")
                else None,
                points=rule.points,
                id=rule.id,
            )
        )
    return rules


def _rule_changes(v: Violations, values: Sequence[programs_pb2.EarningRule]) -> list[EarningRule]:
    for index, rule in enumerate(values[: domain.programs.MAX_RULES]):
        v.id(f"program.earning_rules[{index}].id", rule.id, domain.ids.RULE_ID, required=False)
    return _rules(v, "program.earning_rules", values)


def new_program(request: programs_pb2.CreateProgramRequest) -> tuple[str | None, NewProgram]:
    """The id asked for (None: generate one) and the program to create."""
    v = Violations()
    program_id = v.id("program_id", request.program_id, domain.ids.PROGRAM_ID, required=False)
    program = request.program
    name = _program_name(v, "program.name", program.name)
    currency = parsing.currency(v, "program.currency", program.currency)
    tiers = _tiers(v, "program.tiers", program.tiers)
    status = v.enum("program.status", program.status, _PROGRAM_STATUS_FROM_PB, required=False)
    # Rule ids are output only here: the program's rules are all new.
    rules = [replace(r, id="") for r in _rules(v, "program.earning_rules", program.earning_rules)]
    v.extend(domain.programs.rule_violations("program.earning_rules", rules, tiers))
    hold_policy = _hold_policy(v, program) if program.HasField("hold_policy") else HoldPolicy()
    v.request_id(request.request_id)
    v.raise_if_any()
    new = NewProgram(
        name=name,
        currency=currency,
        auto_enroll=program.auto_enroll,
        tiers=tiers,
        status=status or ProgramStatus.ACTIVE,
        earning_rules=rules,
        hold_policy=hold_policy,
    )
    return program_id or None, new


def program_changes(request: programs_pb2.UpdateProgramRequest) -> tuple[str, ProgramChanges]:
    """The program to update and what changes, as the update_mask says (AIP-134): an empty
    mask means the fields that are set, `*` all of them. Only the named fields are read."""
    v = Violations()
    program = request.program
    program_id = v.id("program.id", program.id, domain.ids.PROGRAM_ID)
    paths = parsing.update_paths(v, request.update_mask.paths, PROGRAM_PATHS)
    if not paths:
        # A proto3 scalar at its default is not "set": false and [] need the mask.
        set_fields = {
            "name": bool(program.name),
            "currency": bool(program.currency),
            "auto_enroll": program.auto_enroll,
            "tiers": bool(program.tiers),
            "earning_rules": bool(program.earning_rules),
            "status": program.status != 0,
            "hold_policy": program.HasField("hold_policy"),
        }
        paths = {path for path, is_set in set_fields.items() if is_set}
    changes = ProgramChanges(
        name=_program_name(v, "program.name", program.name) if "name" in paths else None,
        currency=parsing.currency(v, "program.currency", program.currency)
        if "currency" in paths
        else None,
        auto_enroll=program.auto_enroll if "auto_enroll" in paths else None,
        tiers=_tiers(v, "program.tiers", program.tiers) if "tiers" in paths else None,
        earning_rules=_rule_changes(v, program.earning_rules) if "earning_rules" in paths else None,
        status=v.enum("program.status", program.status, _PROGRAM_STATUS_FROM_PB, required=True)
        if "status" in paths
        else None,
        hold_policy=_hold_policy(v, program) if "hold_policy" in paths else None,
    )
    v.request_id(request.request_id)
    if not paths:
        v.add("update_mask", "names nothing to update")
    v.raise_if_any()
    return program_id, changes


def _hold_policy(v: Violations, program: programs_pb2.Program) -> HoldPolicy:
    """The program's hold policy; a TTL left unset takes its default."""
    given, defaults = program.hold_policy, HoldPolicy()
    policy = HoldPolicy(
        v.ttl("program.hold_policy.default_ttl", given.default_ttl)
        if given.HasField("default_ttl")
        else defaults.default_ttl_seconds,
        v.ttl("program.hold_policy.max_ttl", given.max_ttl)
        if given.HasField("max_ttl")
        else defaults.max_ttl_seconds,
    )
    v.extend(domain.programs.hold_policy_violations("program.hold_policy", policy))
    return policy


def rule_version(request: programs_pb2.GetEarningRuleRequest) -> tuple[str, int | None]:
    v = Violations()
    rule_id = v.id("id", request.id, domain.ids.RULE_ID)
    if request.version < 0:
        v.add("version", "must not be negative (0: the latest)")
    v.raise_if_any()
    return rule_id, request.version or None


def program_status_filter(request: programs_pb2.ListProgramsRequest) -> ProgramStatus | None:
    v = Violations()
    status = v.enum("status", request.status, _PROGRAM_STATUS_FROM_PB, required=False)
    v.raise_if_any()
    return status
