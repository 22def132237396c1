"""production endpoints

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 10:00:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing endpoints stay ungoverned until someone marks them production.
    op.add_column('endpoints', sa.Column('production', sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table('endpoints') as batch:
        batch.drop_column('production')
