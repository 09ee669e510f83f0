"""Alembic environment of the inference log: always run from `mmfusion.logdb.upgrade`, which
hands over an open connection (config.attributes["connection"]) and its own version table."""

from alembic import context

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the inference log's migrations through `python -m mmfusion.logdb upgrade`")

context.configure(
    connection=connection,
    target_metadata=None,
    version_table=config.get_main_option("version_table"),
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
)
with context.begin_transaction():
    context.run_migrations()
