"""Use cases of programs and their earning rules."""

from __future__ import annotations

from dataclasses import replace

from .. import domain, store
from ..domain.callers import Caller
from ..domain.errors import EarningRuleNotFound, ProgramAlreadyExists, ProgramsRestricted
from ..domain.ids import Page
from ..domain.programs import NewProgram, Program, ProgramChanges, ProgramStatus
from ..store.sql import Conn
from .requests import UseCases, program_not_found, raise_if_any

_RULES_PATH = "program.earning_rules"


class ProgramUseCases(UseCases):
    async def create_program(
        self, caller: Caller, program_id: str | None, new: NewProgram, request_id: str = ""
    ) -> Program:
        if caller.programs is not None:
            raise ProgramsRestricted(
                f"{caller.identity} may touch some programs only, and so may not create one",
                caller=caller.identity,
            )
        # A generated id is drawn once per call, outside the transaction: a replay returns
        # the first call's program.
        new_id = program_id or domain.ids.new_id("prog_")

        async def work(conn: Conn) -> Program:
            now = self.clock()
            program = Program(
                id=new_id,
                name=new.name,
                currency=new.currency,
                auto_enroll=new.auto_enroll,
                tiers=new.tiers,
                status=new.status,
                create_time=now,
                update_time=now,
                earning_rules=domain.programs.versioned_rules(_RULES_PATH, [], new.earning_rules),
                actor=caller.identity,
                hold_policy=new.hold_policy,
            )
            if not await store.programs.insert_program(conn, program):
                raise ProgramAlreadyExists(f"program {new_id} already exists", program=new_id)
            await store.programs.save_rule_versions(conn, program)
            return program

        # No program events: the event log records accounts and transactions only.
        params = {"program_id": program_id, "program": domain.codec.to_json(new)}
        return await self.run(caller, "CreateProgram", request_id, params, Program, work)

    async def get_program(self, caller: Caller, program_id: str) -> Program:
        if not caller.sees(program_id):
            raise program_not_found(program_id)
        return await self.found(store.programs.get_program, program_id, program_not_found)

    async def get_earning_rule(
        self, caller: Caller, rule_id: str, version: int | None
    ) -> domain.programs.EarningRule:
        """A rule as it was at `version`, or as it is now (None), also after its removal."""
        found = await self.call(store.programs.get_rule_version, rule_id, version)
        rule = found[1] if found is not None and caller.sees(found[0]) else None
        if rule is None:
            raise EarningRuleNotFound(
                f"earning rule {rule_id} has no version {version}"
                if version
                else f"earning rule {rule_id} does not exist",
                rule=rule_id,
                version=version or "",
            )
        return rule

    async def list_programs(
        self, caller: Caller, status: ProgramStatus | None, after: int | None, limit: int
    ) -> Page[Program]:
        list_programs = store.programs.list_programs
        return await self.call(list_programs, status, caller.programs, after, limit)

    async def update_program(
        self, caller: Caller, program_id: str, changes: ProgramChanges, request_id: str = ""
    ) -> Program:
        async def work(conn: Conn) -> Program:
            # FOR UPDATE: enrollments (which hold the row FOR KEY SHARE) and other updates
            # wait, so the check for accounts below cannot miss one being created.
            program = await store.programs.get_program(conn, program_id, lock="update")
            if program is None or not caller.sees(program_id):
                raise program_not_found(program_id)
            if changes.currency is not None and changes.currency != program.currency:
                has_accounts = await store.programs.program_has_accounts(conn, program_id)
                domain.programs.check_currency_change(program, changes.currency, has_accounts)
            tiers = program.tiers if changes.tiers is None else changes.tiers
            rules = program.earning_rules
            if changes.earning_rules is not None:
                rules = domain.programs.versioned_rules(_RULES_PATH, rules, changes.earning_rules)
            # Checked against the tiers the program will have: a multiplier must name one.
            raise_if_any(domain.programs.rule_violations(_RULES_PATH, rules, tiers))
            updated = replace(
                program,
                name=program.name if changes.name is None else changes.name,
                currency=program.currency if changes.currency is None else changes.currency,
                auto_enroll=program.auto_enroll
                if changes.auto_enroll is None
                else changes.auto_enroll,
                tiers=tiers,
                status=program.status if changes.status is None else changes.status,
                update_time=self.clock(),
                earning_rules=rules,
                actor=caller.identity,
                hold_policy=program.hold_policy
                if changes.hold_policy is None
                else changes.hold_policy,
            )
            await store.programs.save_program(conn, updated)
            await store.programs.save_rule_versions(conn, updated)
            return updated

        params = {"id": program_id, "changes": domain.codec.to_json(changes)}
        return await self.run(caller, "UpdateProgram", request_id, params, Program, work)
