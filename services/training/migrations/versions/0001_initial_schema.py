"""initial schema: training jobs, audit events, request ids

Revision ID: 0001
Revises:
Create Date: 2026-11-30 01:20:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audit_events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('principal', sa.String(length=256), nullable=False),
    sa.Column('method', sa.String(length=256), nullable=False),
    sa.Column('resource', sa.String(length=512), nullable=False),
    sa.Column('request_id', sa.String(length=128), nullable=False),
    sa.Column('time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('outcome', sa.String(length=32), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.create_index('ix_audit_events_principal', ['principal'], unique=False)
        batch_op.create_index('ix_audit_events_resource', ['resource'], unique=False)
    op.create_table('idempotency_keys',
    sa.Column('principal', sa.String(length=256), nullable=False),
    sa.Column('method', sa.String(length=128), nullable=False),
    sa.Column('request_id', sa.String(length=128), nullable=False),
    sa.Column('request_hash', sa.String(length=64), nullable=False),
    sa.Column('resource', sa.String(length=512), nullable=False),
    sa.Column('create_time', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('principal', 'method', 'request_id')
    )
    op.create_table('training_jobs',
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('state', sa.Integer(), nullable=False),
    sa.Column('progress', sa.JSON(), nullable=False),
    sa.Column('result', sa.JSON(), nullable=True),
    sa.Column('error', sa.Text(), nullable=False),
    sa.Column('created_by', sa.String(length=256), nullable=False),
    sa.Column('create_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('start_time', sa.DateTime(timezone=True), nullable=True),
    sa.Column('end_time', sa.DateTime(timezone=True), nullable=True),
    sa.Column('update_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('cancel_requested', sa.Boolean(), nullable=False),
    sa.Column('lease_owner', sa.String(length=128), nullable=False),
    sa.Column('lease_expires', sa.Float(), nullable=False),
    sa.Column('mlflow_run_id', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('job_id')
    )
    with op.batch_alter_table('training_jobs', schema=None) as batch_op:
        batch_op.create_index('ix_training_jobs_state_create', ['state', 'create_time'], unique=False)
        batch_op.create_index('ix_training_jobs_create', ['create_time'], unique=False)


def downgrade() -> None:
    op.drop_table('training_jobs')
    op.drop_table('idempotency_keys')
    op.drop_table('audit_events')
