"""broken: refers to a table that does not exist"""
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade():
    op.execute("ALTER TABLE no_such_table ADD COLUMN x TEXT")


def downgrade():
    pass
