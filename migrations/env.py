"""Alembic environment: runs migrations online, one process at a time."""

import sqlalchemy as sa
from alembic import context

from loyalty_service.db import MIGRATION_LOCK_ID, metadata

# Any number of replicas may start at once; the advisory lock lets one migrate while the
# others wait, and the timeouts keep a migration from queueing behind live traffic forever.


def run_migrations_online() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        connection.execute(sa.text("SET lock_timeout = '10s'"))
        connection.execute(sa.text("SET statement_timeout = '120s'"))
        connection.execute(sa.select(sa.func.pg_advisory_lock(MIGRATION_LOCK_ID)))
        connection.commit()
        try:
            context.configure(connection=connection, target_metadata=metadata)
            with context.begin_transaction():
                context.run_migrations()
            connection.commit()
        finally:
            connection.execute(sa.select(sa.func.pg_advisory_unlock(MIGRATION_LOCK_ID)))
            connection.commit()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run `loyalty-service migrate`")
run_migrations_online()
