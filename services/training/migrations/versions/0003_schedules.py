"""schedules: stored job specs run on cron or by trigger

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 01:35:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('training_schedules',
    sa.Column('schedule_id', sa.String(length=32), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('cron', sa.String(length=256), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('paused', sa.Boolean(), nullable=False),
    sa.Column('next_run_time', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_run_time', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_job_id', sa.String(length=32), nullable=False),
    sa.Column('created_by', sa.String(length=256), nullable=False),
    sa.Column('create_time', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('schedule_id')
    )
    with op.batch_alter_table('training_schedules', schema=None) as batch_op:
        batch_op.create_index('ix_training_schedules_due', ['paused', 'next_run_time'], unique=False)


def downgrade() -> None:
    op.drop_table('training_schedules')
