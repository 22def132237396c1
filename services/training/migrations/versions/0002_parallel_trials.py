"""parallel trials: helper workers join an open search

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 01:25:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('training_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('helper_slots', sa.Integer(), nullable=False, server_default='0'))
    op.create_table('training_job_helpers',
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('slot', sa.Integer(), nullable=False),
    sa.Column('owner', sa.String(length=128), nullable=False),
    sa.Column('lease_expires', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('job_id', 'slot')
    )


def downgrade() -> None:
    op.drop_table('training_job_helpers')
    with op.batch_alter_table('training_jobs', schema=None) as batch_op:
        batch_op.drop_column('helper_slots')
