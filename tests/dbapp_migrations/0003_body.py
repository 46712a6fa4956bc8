"""destructive: answers.text becomes answers.body; code before it cannot read the table"""
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade():
    with op.batch_alter_table("answers") as b:
        b.alter_column("text", new_column_name="body")


def downgrade():
    with op.batch_alter_table("answers") as b:
        b.alter_column("body", new_column_name="text")
