"""Alembic environment: the connection comes from relance.migrate, the schema from relance.store."""

from alembic import context

from relance.store import metadata

connection = context.config.attributes.get("connection")
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection is not None and connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
