"""Alembic environment: the store hands over an open connection (inside its own lock/transaction)."""
from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, version_table="localist_alembic_version")
with context.begin_transaction():
    context.run_migrations()
