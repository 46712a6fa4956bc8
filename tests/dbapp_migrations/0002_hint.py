"""additive: answers.hint (nullable); v1 code runs on it unchanged"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade():
    op.add_column("answers", sa.Column("hint", sa.Text, nullable=True))


def downgrade():
    with op.batch_alter_table("answers") as b:
        b.drop_column("hint")
