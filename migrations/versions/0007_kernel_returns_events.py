"""The posting kernel logs its events, or returns them for the caller to log last.

A use case that writes after the kernel (a payment's outcome, a refund, a stored response)
held the event log's head, and so every other writer's commit, across that round trip. With
`log` false, post_points logs nothing and returns the events as a last row (result UNLOGGED,
`logged`); the use case logs them with log_events pipelined with its COMMIT, so the head is
again the last lock and held for the commit's round trip only.
"""

import importlib.util
from pathlib import Path

from alembic import op

revision = "0007"
down_revision = "0006"

# As in 0006, but for `log` (logged when true; returned as a last row, result UNLOGGED, when
# false) and its output column `logged`.
POST_POINTS = """
CREATE FUNCTION post_points(postings jsonb, wait boolean, snapshots boolean, events jsonb,
    log boolean)
RETURNS TABLE (posting int, result text, points_after bigint, replay_fingerprint text,
    replay_response jsonb, account jsonb, logged jsonb)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    p record;
    a accounts;
    found_accounts accounts[];  -- the accounts locked, as the postings change them
    at jsonb;  -- account id -> its index in found_accounts
    i int;
    priors jsonb := '{}';  -- request key -> [fingerprint, response]
    tiers_of jsonb := '{}';  -- program id -> its tiers, read once per call
    new_tier text;
    promoted boolean;
    posted_idx int[] := '{}';
    posted_after bigint[] := '{}';
    reversals boolean := false;
    keys boolean := false;
    events_to_log jsonb := events;
BEGIN
    -- Read all, decide in order, write all: the accounts are read and locked in one
    -- statement, the postings applied to them in memory, and the rows written in one
    -- statement per table.
    --
    -- Locked in id order (two calls that wait lock in one order, never in a cycle); without
    -- `wait`, skipping those held elsewhere. Found by id = ANY (ARRAY(...)): the primary
    -- key, whatever the planner guesses of a set drawn from JSON.
    IF wait THEN
        SELECT coalesce(array_agg(l.row ORDER BY (l.row).id), '{}') INTO found_accounts FROM (
            SELECT accounts AS row FROM accounts
            WHERE accounts.id = ANY (ARRAY(SELECT jsonb_array_elements(postings) ->> 'account_id'))
            ORDER BY accounts.id FOR UPDATE) AS l;
    ELSE
        SELECT coalesce(array_agg(l.row ORDER BY (l.row).id), '{}') INTO found_accounts FROM (
            SELECT accounts AS row FROM accounts
            WHERE accounts.id = ANY (ARRAY(SELECT jsonb_array_elements(postings) ->> 'account_id'))
            ORDER BY accounts.id FOR UPDATE SKIP LOCKED) AS l;
    END IF;
    SELECT coalesce(jsonb_object_agg(f.id, f.ordinality), '{}') INTO at
    FROM unnest(found_accounts) WITH ORDINALITY AS f;
    -- After the locks: a first attempt that held one has committed its request key.
    IF jsonb_path_exists(postings, '$[*] ? (@.key != null)') THEN
        SELECT coalesce(jsonb_object_agg(k.key, jsonb_build_array(k.fingerprint, k.response)),
                        '{}') INTO priors
        FROM idempotency_keys AS k
        WHERE k.key = ANY (ARRAY(SELECT jsonb_array_elements(postings) ->> 'key'));
    END IF;

    FOR p IN
        SELECT * FROM jsonb_to_recordset(postings) AS r(idx int, id text, account_id text,
            delta bigint, lifetime_delta bigint, min_balance bigint, max_balance bigint,
            closed_ok boolean, reverses_id text, create_time timestamptz, key text,
            event_id text)
        ORDER BY r.idx
    LOOP
        posting := p.idx;
        result := NULL;
        points_after := NULL;
        replay_fingerprint := NULL;
        replay_response := NULL;
        account := NULL;
        logged := NULL;
        -- A stored response first: a retry is answered as the first attempt was, whatever
        -- became of its account (priors holds committed keys only).
        IF p.key IS NOT NULL AND priors ? p.key THEN
            result := 'REPLAYED';
            replay_fingerprint := priors -> p.key ->> 0;
            replay_response := priors -> p.key -> 1;
            RETURN NEXT;
            CONTINUE;
        END IF;
        IF NOT at ? p.account_id THEN
            result := CASE WHEN wait THEN 'ACCOUNT_NOT_FOUND' ELSE 'SKIPPED' END;
            RETURN NEXT;
            CONTINUE;
        END IF;
        i := (at ->> p.account_id)::int;
        a := found_accounts[i];
        IF a.status <> 'ACTIVE' AND NOT (p.closed_ok AND a.status = 'CLOSED') THEN
            result := 'ACCOUNT_NOT_ACTIVE';
        ELSIF a.balance + p.delta > p.max_balance THEN
            result := 'BALANCE_LIMIT_EXCEEDED';
        ELSIF a.balance + p.delta < p.min_balance THEN
            result := 'INSUFFICIENT_POINTS';
        END IF;
        IF result IS NOT NULL THEN
            account := account_json(a);
            RETURN NEXT;
            CONTINUE;
        END IF;

        new_tier := a.tier;
        IF p.lifetime_delta > 0 THEN  -- only a rise of lifetime points moves the tier
            IF NOT tiers_of ? a.program_id THEN
                tiers_of := tiers_of || jsonb_build_object(a.program_id,
                    (SELECT programs.tiers FROM programs WHERE programs.id = a.program_id));
            END IF;
            new_tier := tier_after(tiers_of -> a.program_id, a.tier, a.lifetime_points,
                                   a.lifetime_points + p.lifetime_delta);
        END IF;
        promoted := new_tier <> a.tier;
        a.balance := a.balance + p.delta;
        a.lifetime_points := a.lifetime_points + p.lifetime_delta;
        a.tier := new_tier;
        a.update_time := p.create_time;
        a.version := a.version + 1;
        found_accounts[i] := a;
        posted_idx := posted_idx || p.idx;
        posted_after := posted_after || a.balance;
        reversals := reversals OR p.reverses_id IS NOT NULL;
        keys := keys OR p.key IS NOT NULL;

        events_to_log := events_to_log || jsonb_build_object('id', p.event_id,
            'type', 'points_transaction.created', 'create_time', p.create_time,
            'program_id', a.program_id, 'account_id', a.id, 'transaction_id', p.id);
        IF promoted THEN
            -- Its id is drawn from the transaction event's (random) one: postings that
            -- promote no one draw nothing.
            events_to_log := events_to_log || jsonb_build_object(
                'id', 'evt_' || substr(md5(p.event_id || '.tier'), 1, 20),
                'type', 'loyalty.account.tier_changed', 'create_time', p.create_time,
                'program_id', a.program_id, 'account_id', a.id, 'snapshot', account_json(a));
        END IF;
        result := 'POSTED';
        points_after := a.balance;
        IF snapshots AND p.idx = jsonb_array_length(postings) - 1 THEN
            account := account_json(a);  -- idx runs 0, 1, ...: this is the last posting
        END IF;
        RETURN NEXT;
    END LOOP;

    IF cardinality(posted_idx) > 0 THEN
        UPDATE accounts SET balance = f.balance, lifetime_points = f.lifetime_points,
            tier = f.tier, update_time = f.update_time, version = f.version
        FROM unnest(found_accounts) AS f
        WHERE accounts.id = f.id AND accounts.version <> f.version;
        INSERT INTO points_transactions (id, account_id, original_account_id, type, direction,
            amount, points_after, reason, origin_kind, origin_id, reverses_id,
            reversed_amount, metadata, create_time, rule_id, rule_version)
        SELECT r.id, r.account_id, NULL, r.type, r.direction, r.amount, d.points_after,
            r.reason, r.origin_kind, r.origin_id, r.reverses_id, 0, r.metadata,
            r.create_time, r.rule_id, r.rule_version
        FROM jsonb_to_recordset(postings) AS r(idx int, id text, account_id text, type text,
                direction text, amount bigint, reason text, origin_kind text, origin_id text,
                reverses_id text, rule_id text, rule_version int, metadata jsonb,
                create_time timestamptz)
            JOIN unnest(posted_idx, posted_after) AS d(idx, points_after) USING (idx)
        ORDER BY r.idx;
    END IF;
    IF reversals THEN  -- each reversal counts itself on the transaction it reverses
        UPDATE points_transactions
        SET reversed_amount = points_transactions.reversed_amount + r.total
        FROM (SELECT r.reverses_id, sum(r.amount) AS total
              FROM jsonb_to_recordset(postings) AS r(idx int, reverses_id text, amount bigint)
              WHERE r.reverses_id IS NOT NULL AND r.idx = ANY (posted_idx)
              GROUP BY r.reverses_id) AS r
        WHERE points_transactions.id = r.reverses_id;
    END IF;
    IF keys THEN
        -- In key order: two calls racing on the same keys wait for each other, not in a
        -- cycle.
        INSERT INTO idempotency_keys (key, fingerprint, response, create_time)
        SELECT r.key, r.fingerprint, to_jsonb(r.id), r.create_time
        FROM jsonb_to_recordset(postings) AS r(idx int, id text, key text, fingerprint text,
            create_time timestamptz)
        WHERE r.key IS NOT NULL AND r.idx = ANY (posted_idx)
        ORDER BY r.key;
    END IF;
    IF log THEN
        PERFORM log_events(events_to_log);
    ELSE
        -- The caller logs them, as the last statement before its COMMIT.
        posting := NULL;
        result := 'UNLOGGED';
        points_after := NULL;
        replay_fingerprint := NULL;
        replay_response := NULL;
        account := NULL;
        logged := events_to_log;
        RETURN NEXT;
    END IF;
END
$$
"""


def upgrade() -> None:
    op.execute("DROP FUNCTION post_points(jsonb, boolean, boolean, jsonb)")
    op.execute(POST_POINTS)


def downgrade() -> None:
    op.execute("DROP FUNCTION post_points(jsonb, boolean, boolean, jsonb, boolean)")
    spec = importlib.util.spec_from_file_location(
        "kernel_0006", Path(__file__).with_name("0006_posting_kernel.py")
    )
    assert spec is not None and spec.loader is not None
    kernel_0006 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernel_0006)
    op.execute(kernel_0006.POST_POINTS)
