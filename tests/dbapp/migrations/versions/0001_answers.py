"""answers"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade():
    op.execute("PRAGMA journal_mode=WAL")
    op.create_table("answers", sa.Column("id", sa.Integer, primary_key=True), sa.Column("text", sa.Text))


def downgrade():
    op.drop_table("answers")
