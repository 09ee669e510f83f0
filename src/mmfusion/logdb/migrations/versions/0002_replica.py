"""Rows carry the replica that answered them: `host` and `pid` of the serving process, so one log shared
by several replicas tells them apart (rows written before this have NULL there).

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    cols = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("predictions")}
    if "host" not in cols:
        op.add_column("predictions", sa.Column("host", sa.Text))
    if "pid" not in cols:
        op.add_column("predictions", sa.Column("pid", sa.Integer))
