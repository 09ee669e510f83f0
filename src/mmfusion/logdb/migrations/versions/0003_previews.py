"""Small previews of what a request carried (a thumbnail, the start of a text, a spectrogram picture), one row per
item and modality, kept for the drift report's examples (`package.log.previews`); older logs have none, and the
monitor reads them as such.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if not sa.inspect(op.get_bind()).has_table("previews"):
        op.create_table(
            "previews",
            sa.Column("request_id", sa.Text, nullable=False),
            sa.Column("item", sa.Integer, nullable=False),
            sa.Column("modality", sa.Text, nullable=False),
            sa.Column("format", sa.Text, nullable=False),  # a MIME type: image/webp, text/plain, image/png
            sa.Column("data", sa.LargeBinary, nullable=False),
            sa.PrimaryKeyConstraint("request_id", "item", "modality"),
        )
