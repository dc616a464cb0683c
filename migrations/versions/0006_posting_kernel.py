"""The posting kernel: every change of an account's points goes through post_points.

post_points locks each posting's account, refuses what its status and bounds forbid (saying
why), updates the account's cached balance, lifetime points, tier and version, inserts the
ledger row (counting a reversal on the transaction it reverses), remembers the request id
and, as its last step, appends the postings' events to the log (log_events). The tier rule
is tier_after; tests run one table of cases against it and domain tier_for, which merges
and enrollments use. A later change of the kernel replaces these functions in a migration
of its own.
"""

from alembic import op

revision = "0006"
down_revision = "0005"

# The functions are PL/pgSQL, whose statements' plans are kept for the session (a SQL
# function called from another function is planned again at every call).
#
# The tier an account holds once its lifetime points went from lifetime_before to
# lifetime_after: the highest of the program's tiers (in their order) whose threshold they
# reach, if it ranks above the held one. A held tier the program no longer has ranks below
# all, and gives way only to a threshold above lifetime_before. Never a demotion.
TIER_AFTER = """
CREATE FUNCTION tier_after(tiers jsonb, held text, lifetime_before bigint, lifetime_after bigint)
RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN coalesce((
        SELECT reached.tier ->> 'name'
        FROM jsonb_array_elements(tiers) WITH ORDINALITY AS reached(tier, rank)
        WHERE CAST(reached.tier ->> 'lifetime_points' AS bigint) <= lifetime_after
          AND reached.rank > coalesce((
              SELECT h.rank FROM jsonb_array_elements(tiers) WITH ORDINALITY AS h(tier, rank)
              WHERE h.tier ->> 'name' = held), 0)
          AND (held = ''
               OR EXISTS (SELECT 1 FROM jsonb_array_elements(tiers) AS known(tier)
                          WHERE known.tier ->> 'name' = held)
               OR CAST(reached.tier ->> 'lifetime_points' AS bigint) > lifetime_before)
        ORDER BY reached.rank DESC
        LIMIT 1
    ), held);
END
$$
"""

# An account as the codec writes an Account (domain.codec): event snapshots and replies.
ACCOUNT_JSON = """
CREATE FUNCTION account_json(a accounts) RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN jsonb_build_object('id', a.id, 'program', a.program_id, 'customer', a.customer,
        'status', a.status, 'balance', a.balance, 'lifetime_points', a.lifetime_points,
        'tier', a.tier, 'metadata', a.metadata, 'create_time', a.create_time,
        'update_time', a.update_time, 'merged_into', a.merged_into, 'version', a.version);
END
$$
"""

# Appends events (a JSON array, in order) to the log. Positions come from event_log_head,
# whose row lock the transaction then holds until it commits: positions become visible in
# order, with no gaps. It serialises all writers' commits, so it is the last lock any
# transaction takes and is held for the shortest time.
LOG_EVENTS = """
CREATE FUNCTION log_events(events jsonb) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    n int := jsonb_array_length(events);
    head bigint;
BEGIN
    IF n = 0 THEN
        RETURN;
    END IF;
    UPDATE event_log_head SET position = event_log_head.position + n RETURNING position INTO head;
    INSERT INTO events (position, id, type, create_time, program_id, account_id,
        transaction_id, snapshot)
    SELECT head - n + e.ord, e.event ->> 'id', e.event ->> 'type',
        CAST(e.event ->> 'create_time' AS timestamptz), e.event ->> 'program_id',
        e.event ->> 'account_id', e.event ->> 'transaction_id',
        nullif(e.event -> 'snapshot', 'null')
    FROM jsonb_array_elements(events) WITH ORDINALITY AS e(event, ord);
END
$$
"""

# postings: a JSON array of objects with the keys of store.postings.POSTING_KEYS (idx 0, 1,
# ... in order), applied in order (so several may change one account). wait: wait for each
# account's row lock; without it a posting whose account another transaction holds is
# SKIPPED, so the call never waits on a row lock. snapshots: return the account of the last
# posting, if it is posted, as after it (what a use case answers with). events: events
# to log before the postings' own (an enrollment's account.created before its welcome
# bonus).
#
# One row per posting, in order: `result` is POSTED, REPLAYED (its request key holds a
# response: replay_*), SKIPPED, or why it was refused: ACCOUNT_NOT_FOUND, ACCOUNT_NOT_ACTIVE,
# INSUFFICIENT_POINTS, BALANCE_LIMIT_EXCEEDED (then `account` is the account as it is). A
# refused posting changes nothing; the caller decides whether the others stand.
#
# A request key that a concurrent transaction stored first fails the call (unique
# violation): everything it did is undone with its statement.
POST_POINTS = """
CREATE FUNCTION post_points(postings jsonb, wait boolean, snapshots boolean, events jsonb)
RETURNS TABLE (posting int, result text, points_after bigint, replay_fingerprint text,
    replay_response jsonb, account jsonb)
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
    logged jsonb := events;
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

        logged := logged || jsonb_build_object('id', p.event_id,
            'type', 'points_transaction.created', 'create_time', p.create_time,
            'program_id', a.program_id, 'account_id', a.id, 'transaction_id', p.id);
        IF promoted THEN
            -- Its id is drawn from the transaction event's (random) one: postings that
            -- promote no one draw nothing.
            logged := logged || jsonb_build_object(
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
    PERFORM log_events(logged);
END
$$
"""


def upgrade() -> None:
    for statement in (TIER_AFTER, ACCOUNT_JSON, LOG_EVENTS, POST_POINTS):
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP FUNCTION post_points(jsonb, boolean, boolean, jsonb)")
    op.execute("DROP FUNCTION log_events(jsonb)")
    op.execute("DROP FUNCTION account_json(accounts)")
    op.execute("DROP FUNCTION tier_after(jsonb, text, bigint, bigint)")
