"""Writers queue their events; one sequencer at a time gives them their positions.

Every writer took the one-row event_log_head, held its lock until it committed and
notified: every commit of the system passed one lock, one at a time. Now log_events appends
a transaction's events to event_queue under one value of event_queue_seq, taken when it
logs them: the last thing a writer does, after all its row locks. It takes no lock another
writer needs and sends no notification.

sequence_events makes one pass: under the head's lock, it moves the committed queue into
the log in (seq, ord) order, at the positions after the head, moves the head (whose
trigger, from 0002, notifies once per pass) and commits. ledger.sequencer runs the passes,
one replica at a time. Why positions stay gap-free, final and in each account's order is in
docs/architecture.md ("The event log").

The queue is made LIKE the log, with its checks: a row the log would refuse is refused to
its writer, and never stops the sequencer.
"""

from alembic import context, op

revision = "0009"
down_revision = "0008"

LOG_EVENTS = """
CREATE OR REPLACE FUNCTION log_events(events jsonb) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    call_seq bigint;
BEGIN
    IF jsonb_array_length(events) = 0 THEN
        RETURN;
    END IF;
    -- One value per call, taken now: after every row lock its transaction holds (see the
    -- module's docstring); its events keep their order in `ord`.
    call_seq := nextval('event_queue_seq');
    INSERT INTO event_queue (seq, ord, id, type, create_time, program_id, account_id,
        transaction_id, snapshot)
    SELECT call_seq, e.ord, e.event ->> 'id', e.event ->> 'type',
        CAST(e.event ->> 'create_time' AS timestamptz), e.event ->> 'program_id',
        e.event ->> 'account_id', e.event ->> 'transaction_id',
        nullif(e.event -> 'snapshot', 'null')
    FROM jsonb_array_elements(events) WITH ORDINALITY AS e(event, ord);
END
$$
"""

SEQUENCE_EVENTS = """
CREATE FUNCTION sequence_events(max_events int) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    head bigint;
    moved bigint;
BEGIN
    IF NOT EXISTS (SELECT FROM event_queue ORDER BY seq, ord LIMIT 1) THEN
        RETURN 0;  -- nothing queued: no lock taken, so an idle poll writes nothing
    END IF;
    -- One pass at a time, whoever runs it: the head's row lock, held until this pass
    -- commits. The statement below begins after the lock is granted, so its snapshot sees
    -- every earlier pass's work, and no queued row is moved twice.
    SELECT position INTO head FROM event_log_head WHERE id = 1 FOR UPDATE;
    WITH taken AS (
        DELETE FROM event_queue
        WHERE (seq, ord) IN (SELECT q.seq, q.ord FROM event_queue AS q
                             ORDER BY q.seq, q.ord LIMIT max_events)
        RETURNING *
    )
    INSERT INTO events (position, id, type, create_time, program_id, account_id,
        transaction_id, snapshot)
    SELECT head + row_number() OVER (ORDER BY t.seq, t.ord), t.id, t.type, t.create_time,
        t.program_id, t.account_id, t.transaction_id, t.snapshot
    FROM taken AS t;
    GET DIAGNOSTICS moved = ROW_COUNT;
    IF moved > 0 THEN
        UPDATE event_log_head SET position = head + moved WHERE id = 1;
    END IF;
    RETURN moved;
END
$$
"""


def upgrade() -> None:
    op.execute("CREATE SEQUENCE event_queue_seq AS bigint")
    op.execute(
        "CREATE TABLE event_queue (LIKE events INCLUDING CONSTRAINTS)"
        " WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000)"
    )
    op.execute("ALTER TABLE event_queue DROP COLUMN position")
    op.execute("ALTER TABLE event_queue ADD COLUMN seq bigint NOT NULL")
    op.execute("ALTER TABLE event_queue ADD COLUMN ord int NOT NULL")
    op.execute("ALTER TABLE event_queue ADD CONSTRAINT pk_event_queue PRIMARY KEY (seq, ord)")
    op.execute(LOG_EVENTS)
    op.execute(SEQUENCE_EVENTS)
    # Every queued row is found through the queue's key, in key order, however small the
    # queue was when the pass's statements were planned (see 0008).
    op.execute("ALTER FUNCTION sequence_events(int) SET enable_seqscan = off")


def downgrade() -> None:
    # What is queued goes into the log first; writers still running wait for the table.
    op.execute("LOCK TABLE event_queue IN ACCESS EXCLUSIVE MODE")
    op.execute("SELECT sequence_events(2147483647)")
    op.execute("DROP FUNCTION sequence_events(int)")
    op.execute("DROP FUNCTION log_events(jsonb)")
    op.execute(context.script.get_revision("0006").module.LOG_EVENTS)
    op.execute("DROP TABLE event_queue")
    op.execute("DROP SEQUENCE event_queue_seq")
