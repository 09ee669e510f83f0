"""The inference log as it was before the schema was versioned: predictions, embeddings, inputs, feedback.

A log file written by an older service already has some of these tables: only what it lacks is created
(the tables, `predictions.client_request_id`, the indexes), so it comes forward without losing a row.
Logs older still kept images in a table `images` and texts in `predictions.text`; those stay, and
`read_kept` reads them.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _has(table: str) -> bool:
    return sa.inspect(op.get_bind()).has_table(table)


def upgrade() -> None:
    if not _has("predictions"):
        op.create_table(
            "predictions",
            sa.Column("request_id", sa.Text, nullable=False),
            sa.Column("item", sa.Integer, nullable=False),
            sa.Column("ts", sa.Float(53), nullable=False),
            sa.Column("time", sa.Text, nullable=False),
            sa.Column("endpoint", sa.Text, nullable=False),
            sa.Column("model_version", sa.Text, nullable=False),
            sa.Column("label", sa.Text, nullable=False),
            sa.Column("confidence", sa.Float(53), nullable=False),
            sa.Column("probabilities", sa.Text, nullable=False),
            sa.Column("contributions", sa.Text, nullable=False),
            sa.Column("modalities", sa.Text, nullable=False),
            sa.Column("latency_ms", sa.Float(53)),
            sa.Column("client_request_id", sa.Text),
            sa.PrimaryKeyConstraint("request_id", "item"),
        )
    else:
        cols = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("predictions")}
        if "client_request_id" not in cols:
            op.add_column("predictions", sa.Column("client_request_id", sa.Text))
    if not _has("embeddings"):
        op.create_table(
            "embeddings",
            sa.Column("request_id", sa.Text, nullable=False),
            sa.Column("item", sa.Integer, nullable=False),
            sa.Column("modality", sa.Text, nullable=False),
            sa.Column("dim", sa.Integer, nullable=False),
            sa.Column("vector", sa.LargeBinary, nullable=False),  # float32 little-endian
            sa.PrimaryKeyConstraint("request_id", "item", "modality"),
        )
    if not _has("inputs"):
        op.create_table(
            "inputs",
            sa.Column("request_id", sa.Text, nullable=False),
            sa.Column("item", sa.Integer, nullable=False),
            sa.Column("modality", sa.Text, nullable=False),
            sa.Column("format", sa.Text),
            sa.Column("data", sa.LargeBinary, nullable=False),
            sa.PrimaryKeyConstraint("request_id", "item", "modality"),
        )
    if not _has("feedback"):
        op.create_table(
            "feedback",
            sa.Column("request_id", sa.Text, nullable=False),
            sa.Column("item", sa.Integer, nullable=False),
            sa.Column("label", sa.Text, nullable=False),
            sa.Column("ts", sa.Float(53), nullable=False),
            sa.Column("time", sa.Text, nullable=False),
            sa.Column("predicted", sa.Text),
            sa.Column("model_version", sa.Text),
            sa.Column("usable", sa.Integer, nullable=False),
            sa.Column("reason", sa.Text),  # why not usable: <modality>_not_kept
            sa.PrimaryKeyConstraint("request_id", "item"),
        )
    bind = op.get_bind()
    for name, table, cols in (
        ("predictions_ts", "predictions", "ts"),
        ("predictions_client_request_id", "predictions", "client_request_id"),
        ("feedback_ts", "feedback", "ts"),
    ):
        bind.execute(sa.text(f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({cols})"))
