"""broken, on top of 0002: refers to a table that does not exist"""
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade():
    op.execute("ALTER TABLE no_such_table ADD COLUMN x TEXT")


def downgrade():
    pass
